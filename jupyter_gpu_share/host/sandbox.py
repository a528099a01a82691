"""Run a renter's kernel inside a sandbox (bubblewrap by default) with resource limits.

A :class:`Sandbox` turns "run this kernel" into a :class:`LaunchPlan`: the argv to exec, its
environment, a ``preexec`` that sets the resource limits, and where the kernel finds its
connection file. :class:`BwrapSandbox` builds a bubblewrap command line:

- a fresh root with read-only system directories (``/usr``, ``/lib*``, ``/bin``, a minimal
  ``/etc``) and the agent's Python (its prefixes and site-packages);
- the session's scratch directory, writable, as ``$HOME`` (``/home/renter``) and ``/tmp``;
  nothing else of the host's home or of the agent's scratch root (other sessions) is mounted;
- ``/proc``, a minimal ``/dev`` plus only the rented ``/dev/nvidiaN`` and the NVIDIA control
  devices; new PID, IPC and UTS namespaces; with ``network="none"`` a network namespace of
  its own too (only its own loopback: the host's loopback services, LAN and the internet are
  out of reach; the channels are Unix sockets, which need no network); by default
  (``"host"``) the host's network is shared (see ``network.py`` for the public-only one);
- a cleared environment with only the kernel's variables; when the agent runs as root, the
  kernel runs as ``nobody`` (65534) inside a user namespace, with every capability dropped.

Limits (``RLIMIT_AS`` or ``RLIMIT_DATA``, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``) are set in the
child before exec and are inherited by the kernel. Linux does not enforce ``RLIMIT_NPROC``
for processes whose real user is root, so a process limit needs an unprivileged agent.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import site
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec

from . import netguard, procfs
from .cgroups import CgroupError, CgroupLimits, CgroupSupport, KernelCgroup, detect
from .network import (
    INNER_IFNAME,
    GuardSpec,
    NetworkConfigError,
    NetworkPolicy,
    guard_spec,
    missing_tools,
    nft_ruleset,
    parse_network,
    pasta_argv,
    read_host_networks,
    route_batch,
)
from .uids import UidError, UidLease, UidPool

log = logging.getLogger(__name__)

SANDBOX_HOME = "/home/renter"
WORK_DIR = "work"  # in the scratch folder: the kernel's working folder
SANDBOX_RUN = "/run/gpu-share"
CGROUP_PREFIX = "k-"
NOBODY = 65534
NVIDIA_CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
INSTALL_HINT = (
    "bubblewrap (bwrap) is not installed: install it (e.g. apt-get install bubblewrap) "
    "or pass --no-sandbox to run renters' kernels unsandboxed"
)

# Files and folders of /etc that programs commonly need; mounted read-only when present.
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "host.conf",
    "hosts",
    "resolv.conf",
    "gai.conf",
    "localtime",
    "timezone",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "mime.types",
    "fonts",
    "protocols",
    "services",
)
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

MEMORY_RLIMITS = {"as": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA}


class SandboxError(RuntimeError):
    """The sandbox cannot be used on this machine."""


@dataclass(frozen=True)
class ResourceLimits:
    """Per-kernel limits; 0 means no limit."""

    memory_mib: int = 0
    max_processes: int = 0
    max_open_files: int = 0
    memory_rlimit: str = "as"  # "as": address space; "data": heap and private mappings
    max_file_mib: int = 0  # RLIMIT_FSIZE: no single file larger (the scratch quota)

    def __post_init__(self) -> None:
        if self.memory_rlimit not in MEMORY_RLIMITS:
            raise ValueError(f"memory_rlimit must be 'as' or 'data', not {self.memory_rlimit!r}")
        for name in ("memory_mib", "max_processes", "max_open_files", "max_file_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def rlimits(self) -> list[tuple[int, int]]:
        """Return ``(resource, value)`` pairs to set (soft and hard)."""
        out = []
        if self.memory_mib:
            out.append((MEMORY_RLIMITS[self.memory_rlimit], self.memory_mib * 1024 * 1024))
        if self.max_processes:
            out.append((resource.RLIMIT_NPROC, self.max_processes))
        if self.max_open_files:
            out.append((resource.RLIMIT_NOFILE, self.max_open_files))
        if self.max_file_mib:
            # One file cannot outgrow the scratch quota between two watchdog checks (Python
            # ignores SIGXFSZ, so a cell gets EFBIG; other programs are stopped by it).
            out.append((resource.RLIMIT_FSIZE, self.max_file_mib * 1024 * 1024))
        return out

    def preexec(self) -> Callable[[], None] | None:
        """Return a function that applies the limits in the child, or None without limits."""
        limits = self.rlimits()
        if not limits:
            return None
        return self.apply_function(limits)

    @staticmethod
    def apply_function(limits: Sequence[tuple[int, int]]) -> Callable[[], None]:
        """A function that sets these ``(resource, value)`` limits in the calling process."""

        def apply() -> None:
            for which, value in limits:
                _soft, hard = resource.getrlimit(which)
                if hard != resource.RLIM_INFINITY and value > hard:
                    value = hard  # an unprivileged process cannot raise its hard limit
                resource.setrlimit(which, (value, value))

        return apply


@dataclass
class LaunchPlan:
    """How to exec one kernel."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    preexec: Callable[[], None] | None = None
    pass_fds: tuple[int, ...] = ()
    info_fd: int | None = None  # read end of bwrap's --info-fd pipe (the parent owns it)
    sandboxed: bool = False
    release: Callable[[], None] | None = None  # gives back what the kernel held (its uid)
    uid: int | None = None  # the kernel's own uid on the host, where it has one
    gid: int | None = None
    stop_reason: Callable[[], str | None] | None = None  # e.g. "out of memory (limit ...)"
    child_pid_depth: int = 0  # pid namespaces between us and bwrap (1 with pasta)


def work_dir(scratch_dir: str) -> str:
    """The kernel's working folder in its scratch folder (the scratch itself for a
    command started without one)."""
    folder = os.path.join(scratch_dir, WORK_DIR)
    return folder if os.path.isdir(folder) else scratch_dir


def kernel_argv(python: str, connection_file: str) -> list[str]:
    """Return the command that starts ipykernel on a connection file."""
    return [python, "-m", "ipykernel_launcher", "-f", connection_file]


def gpu_device_paths(minors: Iterable[int], dev: str = "/dev") -> list[str]:
    """Return the device nodes a kernel on these GPUs needs that exist on this host."""
    paths = [os.path.join(dev, f"nvidia{int(m)}") for m in minors]
    paths += [os.path.join(dev, os.path.basename(p)) for p in NVIDIA_CONTROL_DEVICES]
    return [p for p in paths if os.path.exists(p)]


def _prune_nested(paths: Iterable[str]) -> list[str]:
    """Drop duplicates and paths that lie inside another path of the list (order kept)."""
    real = []
    for path in paths:
        path = os.path.normpath(path)
        if path not in real:
            real.append(path)
    return [
        p
        for p in real
        if not any(q != p and (p + os.sep).startswith(q.rstrip(os.sep) + os.sep) for q in real)
    ]


def python_paths(python: str = sys.executable) -> list[str]:
    """Return the folders the agent's interpreter needs to run ipykernel."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    with_site = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    candidates += with_site
    for module in ("ipykernel", "zmq", "jupyter_client", "IPython", "traitlets"):
        spec = find_spec(module)
        if spec is not None and spec.origin:
            # the folder holding the package: a site-packages or a user site
            candidates.append(os.path.dirname(os.path.dirname(spec.origin)))
    paths = [p for p in candidates if p and os.path.isdir(p) and p != "/"]
    return _prune_nested(paths)


def _passwd(uid: int, gid: int) -> tuple[str, str]:
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"nobody:x:{NOBODY}:{NOBODY}:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nnogroup:x:{NOBODY}:\n"
    if uid not in (0, NOBODY):
        passwd += f"renter:x:{uid}:{gid}:renter:{SANDBOX_HOME}:/bin/sh\n"
    if gid not in (0, NOBODY):
        group += f"renter:x:{gid}:\n"
    return passwd, group


class Sandbox:
    """No sandbox: the kernel runs as the agent's user, with the resource limits only."""

    kind = "none"

    def __init__(self, limits: ResourceLimits | None = None) -> None:
        self.limits = limits or ResourceLimits()

    def check(self) -> None:
        """Raise SandboxError when this sandbox cannot run here."""

    def enforcement(self) -> tuple[list[str], dict[str, str]]:
        """What holds for each kernel, and what is not enforced with the reason why."""
        return [], {"sandbox": "kernels run as this agent's user, with the host's files"}

    def describe(self) -> dict[str, object]:
        """The sandbox as renters see it in the marketplace (see broker/host_messages.py)."""
        return {
            "kind": "none",
            "network": "host",
            "uid": "agent",
            "limits": {
                "memory_mib": self.limits.memory_mib or None,
                "max_processes": self.limits.max_processes or None,
            },
            "enforced": [],
            "unenforced": ["sandbox"],
        }

    def plan(
        self,
        *,
        python: str,
        connection_file: str,
        scratch_dir: str,
        runtime_dir: str,
        env: dict[str, str],
        gpu_minors: Sequence[int] = (),
    ) -> LaunchPlan:
        """Return how to start the kernel."""
        return LaunchPlan(
            argv=kernel_argv(python, connection_file),
            env=dict(env),
            cwd=work_dir(scratch_dir),
            preexec=self.limits.preexec(),
        )


class BwrapSandbox(Sandbox):
    """Run each kernel under bubblewrap (see the module docstring)."""

    kind = "bwrap"

    def __init__(
        self,
        limits: ResourceLimits | None = None,
        *,
        bwrap: str | None = None,
        extra_ro_paths: Sequence[str] = (),
        python: str = sys.executable,
        network: str | NetworkPolicy = "host",
        uid_pool: UidPool | None = None,
        shm_mib: int = 0,
        cgroup_limits: CgroupLimits | None = None,
        cgroups: CgroupSupport | None = None,
    ) -> None:
        super().__init__(limits)
        if isinstance(network, str) and network != "host":
            try:
                network = parse_network(network)
            except NetworkConfigError as err:
                raise ValueError(str(err)) from None
        # "host": shared with the machine; a NetworkPolicy: a namespace of the kernel's own,
        # with only its loopback ("none") or a pasta stack whose refusals netguard sets up.
        self.policy: NetworkPolicy | None = None if network == "host" else network
        self.network = "host" if self.policy is None else self.policy.mode
        self.bwrap = bwrap or shutil.which("bwrap") or ""
        self.pasta = shutil.which("pasta") or ""
        self.extra_ro_paths = [os.path.abspath(p) for p in extra_ro_paths]
        self.python = python
        self.as_root = os.geteuid() == 0
        self.uid_pool = uid_pool
        self.shm_mib = shm_mib or self.limits.memory_mib  # /dev/shm: at most the memory limit
        self._ro_paths = _prune_nested(python_paths(python) + self.extra_ro_paths)
        self._guard_python = ""
        # The memory (shmem and tmpfs included), process and CPU limits that hold for root
        # too; without cgroup support they are not enforced, and describe() says so.
        self.cgroup_limits = cgroup_limits or CgroupLimits()
        self.cgroups = cgroups
        if self.cgroup_limits.requested() and self.cgroups is None:
            self.cgroups = detect()

    @property
    def stack(self) -> bool:
        """Tell whether kernels reach the network through pasta."""
        return self.policy is not None and self.policy.needs_stack

    @property
    def own_uid(self) -> bool:
        """Tell whether each kernel runs as a uid of its own (an agent that runs as root)."""
        return self.uid_pool is not None

    @staticmethod
    def available() -> bool:
        """Tell whether bwrap is on PATH."""
        return shutil.which("bwrap") is not None

    def check(self) -> None:
        """Raise SandboxError unless bwrap (and pasta, uids) can build a sandbox here."""
        if not self.bwrap or not os.access(self.bwrap, os.X_OK):
            raise SandboxError(INSTALL_HINT)
        if self.stack:
            missing = missing_tools(self.policy) if self.policy else []
            if missing:
                raise SandboxError(
                    "a kernel network needs " + ", ".join(missing) + "; or pass --network none"
                )
            if self.as_root and not self.own_uid:
                raise SandboxError(
                    "pasta does not run as root: a kernel network needs kernel uids "
                    "(HostAgent.kernel_uids) when the agent runs as root"
                )
            if not usable_by_others("/dev/net/tun", os.R_OK | os.W_OK) and self.own_uid:
                raise SandboxError(
                    "/dev/net/tun is not open to other users (its stock mode is 0666: "
                    "chmod 666 /dev/net/tun), so pasta cannot start a kernel network"
                )
            self._guard_python = self._find_guard_python()
            try:
                read_host_networks()
            except (OSError, NetworkConfigError) as err:
                raise SandboxError(f"cannot read this host's networks: {err}") from None
        if self.uid_pool is not None:
            try:
                self.uid_pool.check()
            except UidError as err:
                raise SandboxError(str(err)) from None
            hidden = [p for p in self._ro_paths if not usable_by_others(p, os.R_OK | os.X_OK)]
            if hidden:
                raise SandboxError(
                    f"kernels run as uids of their own, and the kernels' Python ({hidden[0]}) "
                    "is not readable by other users: make it readable (e.g. chmod o+x on the "
                    "folder that hides it) or install the agent in a Python that other users "
                    "can read (python3 -m venv /opt/gpu-share)"
                )
        argv = [self.bwrap, *self._namespace_args(), *self._system_args(), "--", "true"]
        preexec = self._switch_user(self.uid_pool.uids.start) if self.uid_pool else None
        try:
            done = subprocess.run(
                argv, capture_output=True, timeout=20, check=False, preexec_fn=preexec, cwd="/"
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SandboxError(f"bwrap could not run: {err}") from None
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise SandboxError(
                "bwrap is installed but cannot create a sandbox here"
                f" ({detail[-1] if detail else f'exit code {done.returncode}'}); "
                "allow user namespaces or pass --no-sandbox"
            )

    def _find_guard_python(self) -> str:
        """A Python that netguard can run as the kernel's uid (it needs the stdlib only)."""
        candidates = [os.path.realpath(sys.executable), "/usr/bin/python3"]
        for path in candidates:
            if os.path.exists(path) and (
                not self.own_uid or usable_by_others(path, os.R_OK | os.X_OK)
            ):
                return path
        raise SandboxError(
            "a kernel network needs a Python that other users can run (/usr/bin/python3)"
        )

    @staticmethod
    def _switch_user(uid: int, gid: int | None = None) -> Callable[[], None]:
        """A preexec that drops the child to ``uid`` for good (groups, real, saved ids)."""
        gid = uid if gid is None else gid

        def switch() -> None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)

        return switch

    def _namespace_args(self) -> list[str]:
        args = [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "gpu-share",
            "--die-with-parent",
            "--new-session",
        ]
        if self.policy is not None and not self.stack:
            args.append("--unshare-net")  # only its own loopback
        # The kernel is nobody in a user namespace of its own, with no capability and no
        # way to make another namespace (in which it would be root again).
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
        args += ["--cap-drop", "ALL", "--disable-userns"]
        return args

    def _system_args(self, resolv_conf: str | None = None) -> list[str]:
        args: list[str] = []
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for name in ETC_ENTRIES:
            path = os.path.join("/etc", name)
            if name == "resolv.conf" and self.policy is not None:
                continue  # the kernel's own resolver, or none
            if os.path.lexists(path) and os.path.exists(path):
                args += ["--ro-bind", path, path]
        if resolv_conf:
            args += ["--ro-bind", resolv_conf, "/etc/resolv.conf"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        # /dev/shm is memory: bounded, and the rest of /dev and the root are read-only, so
        # the scratch folder is the only place a kernel can write to disk.
        if self.shm_mib:
            args += ["--size", str(self.shm_mib * 1024 * 1024)]
        args += ["--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
        return args

    @staticmethod
    def _inner_connection_file(
        connection_file: str, network: str = "host"
    ) -> tuple[str, list[str]]:
        """The connection file as the kernel sees it, and the binds it needs. Unix sockets:
        their folder is bound (writable) at SANDBOX_RUN/zmq, and the file names that path."""
        with open(connection_file, encoding="utf-8") as handle:
            info = json.load(handle)
        if info.get("transport") != "ipc":
            if network != "host":
                raise SandboxError(
                    "a kernel with its own network needs Unix-socket channels: choose a "
                    "shorter scratch root (the socket path must fit 100 bytes)"
                )
            return connection_file, []
        folder, name = os.path.split(info["ip"])
        info["ip"] = f"{SANDBOX_RUN}/zmq/{name}"
        inner = os.path.join(os.path.dirname(connection_file), "kernel-inner.json")
        with open(inner, "w", encoding="utf-8") as handle:
            json.dump(info, handle)
        os.chmod(inner, 0o600)
        return inner, ["--bind", folder, f"{SANDBOX_RUN}/zmq"]

    def plan(
        self,
        *,
        python: str,
        connection_file: str,
        scratch_dir: str,
        runtime_dir: str,
        env: dict[str, str],
        gpu_minors: Sequence[int] = (),
    ) -> LaunchPlan:
        """Return the command line that runs the kernel: [pasta, netguard,] bwrap, kernel."""
        inner_file, socket_binds = self._inner_connection_file(connection_file, self.network)
        inner_cf = f"{SANDBOX_RUN}/kernel.json"
        return self.plan_command(
            kernel_argv(python, inner_cf),
            scratch_dir=scratch_dir,
            runtime_dir=runtime_dir,
            env=env,
            gpu_minors=gpu_minors,
            binds=[*socket_binds, "--ro-bind", inner_file, inner_cf],
            path_first=os.path.dirname(python),
        )

    def plan_command(
        self,
        argv: Sequence[str],
        *,
        scratch_dir: str,
        runtime_dir: str,
        env: dict[str, str],
        gpu_minors: Sequence[int] = (),
        binds: Sequence[str] = (),
        path_first: str = "",
    ) -> LaunchPlan:
        """Return how to run ``argv`` in this sandbox (a kernel, or the host's idle command),
        with the scratch folder as its home and the same network, uid and limits."""
        lease = self.uid_pool.acquire() if self.uid_pool is not None else None
        try:
            return self._plan(
                lease, list(argv), scratch_dir, runtime_dir, env, gpu_minors, binds, path_first
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    def _plan(
        self,
        lease: UidLease | None,
        command: list[str],
        scratch_dir: str,
        runtime_dir: str,
        env: dict[str, str],
        gpu_minors: Sequence[int],
        binds: Sequence[str],
        path_first: str,
    ) -> LaunchPlan:
        passwd, group = _passwd(NOBODY, NOBODY)
        for name, text in (("passwd", passwd), ("group", group)):
            with open(os.path.join(runtime_dir, name), "w", encoding="ascii") as fh:
                fh.write(text)
        guard: GuardSpec | None = None
        resolv_conf = None
        if self.stack:
            assert self.policy is not None
            guard = guard_spec(self.policy, read_host_networks())
            resolv_conf = os.path.join(runtime_dir, "resolv.conf")
            with open(resolv_conf, "w", encoding="ascii") as fh:
                fh.write(f"nameserver {guard.gateway}\noptions timeout:2 attempts:2\n")
        args = [self.bwrap, *self._namespace_args(), *self._system_args(resolv_conf)]
        args += ["--ro-bind", os.path.join(runtime_dir, "passwd"), "/etc/passwd"]
        args += ["--ro-bind", os.path.join(runtime_dir, "group"), "/etc/group"]
        for device in gpu_device_paths(gpu_minors):
            args += ["--dev-bind", device, device]
        # The scratch first: the interpreter's folders may lie under /tmp (a venv) and
        # must be mounted on top of it, not hidden by it.
        args += ["--bind", scratch_dir, SANDBOX_HOME, "--bind", scratch_dir, "/tmp"]
        for path in self._ro_paths:
            args += ["--ro-bind", path, path]
        args += list(binds)
        inner_env = dict(env)
        inner_env.pop("JPY_PARENT_PID", None)  # --die-with-parent does that job
        inner_env.update(
            HOME=SANDBOX_HOME,
            TMPDIR="/tmp",
            USER="nobody",
            LOGNAME="nobody",
            PATH=os.pathsep.join(
                [p for p in (path_first, "/usr/local/bin", "/usr/bin", "/bin") if p]
            ),
        )
        inner_cwd = SANDBOX_HOME
        if work_dir(scratch_dir) != scratch_dir:
            inner_cwd = f"{SANDBOX_HOME}/{WORK_DIR}"
        args += ["--remount-ro", "/", "--chdir", inner_cwd, "--clearenv"]
        for name, value in sorted(inner_env.items()):
            args += ["--setenv", name, value]
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        args += ["--info-fd", str(write_fd), "--", *command]
        rlimits = self.limits.rlimits()
        if guard is not None:
            # pasta runs first, unlimited (its sockets are the kernel's connections);
            # netguard sets the kernel's limits once the namespace is ready.
            spec_file = os.path.join(runtime_dir, "guard.json")
            with open(spec_file, "w", encoding="utf-8") as fh:
                json.dump(guard_file_spec(guard, rlimits), fh)
            script = os.path.join(runtime_dir, "netguard.py")
            shutil.copyfile(netguard.__file__, script)
            chain = pasta_argv(self.pasta, guard, os.path.join(runtime_dir, "pasta.log"))
            args = [
                *chain,
                self._guard_python or self._find_guard_python(),
                "-I",
                script,
                spec_file,
                "--",
                *args,
            ]
            rlimits = []
        if lease is not None:
            # Everything the chain opens as the kernel's uid: its folders, its files.
            for folder in (os.path.dirname(scratch_dir), os.path.dirname(runtime_dir)):
                _allow_traverse(folder)
                if not usable_by_others(folder, os.X_OK):
                    raise SandboxError(
                        f"kernels run as uids of their own, and {folder} lies in a folder "
                        "other users cannot pass through: choose a scratch root under /tmp "
                        "or /var/lib"
                    )
            ipython = os.path.join(scratch_dir, ".ipython")  # the startup magic's folders
            extra = _tree(ipython) if os.path.isdir(ipython) else []
            for path in [*_tree(runtime_dir), scratch_dir, work_dir(scratch_dir), *extra]:
                os.lchown(path, lease.uid, lease.gid)
        cgroup = self._kernel_cgroup(cgroup_prefix(os.path.dirname(scratch_dir)))
        steps = [cgroup.preexec()] if cgroup is not None and cgroup.paths else []
        if lease is not None:
            steps.append(self._switch_user(lease.uid, lease.gid))
        # Last, as a change of uid clears it: the chain dies with the agent. bwrap has
        # --die-with-parent, but pasta, between the agent and bwrap, has no such option, and
        # a killed agent left pasta and the renter's kernel running (found in CI).
        steps.append(die_with_parent(os.getpid()))
        preexec = _child_setup(steps, rlimits)

        def release() -> None:
            if cgroup is not None:
                cgroup.kill()
                if not cgroup.remove():
                    log.warning("could not remove the kernel's cgroup %s", cgroup.paths)
            if lease is not None:
                lease.release()

        return LaunchPlan(
            argv=args,
            env={"PATH": os.environ.get("PATH", os.defpath)},
            cwd="/",
            preexec=preexec,
            pass_fds=(write_fd,),
            info_fd=read_fd,
            sandboxed=True,
            release=release,
            uid=lease.uid if lease is not None else None,
            gid=lease.gid if lease is not None else None,
            stop_reason=cgroup.oom_reason if cgroup is not None else None,
            child_pid_depth=1 if guard is not None else 0,
        )

    def _kernel_cgroup(self, prefix: str) -> KernelCgroup | None:
        """A cgroup of its own for the next kernel, with its limits (None: none asked)."""
        if not self.cgroup_limits.requested() or self.cgroups is None:
            return None
        if not self.cgroups.usable:
            return None
        try:
            return KernelCgroup.create(
                f"{prefix}{secrets.token_hex(6)}", self.cgroup_limits, self.cgroups
            )
        except (OSError, CgroupError) as err:
            raise SandboxError(f"cannot create the kernel's cgroup: {err}") from None

    def enforcement(self) -> tuple[list[str], dict[str, str]]:
        """What holds for each kernel, and what is not enforced with the reason why."""
        enforced = ["bubblewrap", "read-only root", "no capabilities"]
        missing: dict[str, str] = {}
        if self.policy is not None:
            enforced.append(f"network {self.network}")
        else:
            missing["network"] = "kernels share this host's network (network = 'host')"
        if self.own_uid:
            enforced.append("uid of its own")
        elif self.as_root:
            missing["uid"] = "kernels run as root outside their user namespace (kernel_uids)"
        else:
            enforced.append("agent's uid")
        support = self.cgroups
        for name in self.cgroup_limits.requested():
            if support is not None and name in support.usable:
                enforced.append(f"cgroup {name}")
            else:
                reason = support.reason(name) if support is not None else "no cgroup support"
                missing[f"cgroup {name}"] = reason or "not available"
        return enforced, missing

    def describe(self) -> dict[str, object]:
        """The sandbox as renters see it in the marketplace (see broker/host_messages.py)."""
        enforced, missing = self.enforcement()
        limits = {
            "memory_mib": self.cgroup_limits.memory_mib or self.limits.memory_mib or None,
            "max_processes": self.cgroup_limits.max_processes or self.limits.max_processes or None,
            "cpu": self.cgroup_limits.cpu or None,
        }
        if self.policy is not None and self.stack:
            limits["bandwidth_kbit"] = self.policy.bandwidth_kbit or None
            limits["connections_per_minute"] = self.policy.connections_per_minute or None
        return {
            "kind": self.kind,
            "network": self.network,
            "uid": "dedicated" if self.own_uid else "agent",
            "limits": limits,
            "enforced": enforced[:16],
            "unenforced": list(missing)[:16],
        }


def cgroup_prefix(scratch_root: str) -> str:
    """The first part of the names of the cgroups of kernels with this scratch root: one
    agent holds a scratch root (leftovers.RunDir), so at start it may clear what has it."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(scratch_root))).hexdigest()
    return f"{CGROUP_PREFIX}{digest[:8]}-"


def read_child_pid(info_fd: int) -> int | None:
    """Read bwrap's ``--info-fd`` JSON from ``info_fd`` (closing it): its child's pid.

    Blocking; run it in a thread. It stops at the first whole JSON object: pasta, between
    the agent and bwrap, holds its copy of the pipe open for the kernel's life, so the end
    of the pipe comes only when the kernel is gone. None: the sandbox never started.
    """
    data = b""
    try:
        while len(data) < 65536:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            data += chunk
            try:
                return int(json.loads(data)["child-pid"])
            except ValueError:
                continue  # not all of it yet
            except (KeyError, TypeError):
                return None
        return None
    finally:
        os.close(info_fd)


async def spawn(plan: LaunchPlan, output: int) -> asyncio.subprocess.Process:
    """Start a planned command in a session of its own; ``output`` is where its stdout and
    stderr go: ``asyncio.subprocess.PIPE`` (one pipe, both) or ``DEVNULL``.

    The descriptors the plan passes are closed here once the child holds them; the info
    pipe's read end stays open for ``sandbox_child`` unless the start fails.
    """
    try:
        return await asyncio.create_subprocess_exec(
            *plan.argv,
            cwd=plan.cwd,
            env=plan.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT if output == asyncio.subprocess.PIPE else output,
            start_new_session=True,
            preexec_fn=plan.preexec,
            pass_fds=plan.pass_fds,
        )
    except BaseException:
        if plan.info_fd is not None:
            os.close(plan.info_fd)
        raise
    finally:
        for fd in plan.pass_fds:
            os.close(fd)


async def sandbox_child(
    process: asyncio.subprocess.Process, plan: LaunchPlan, timeout: float
) -> int | None:
    """The pid (and process group) of the command inside the sandbox, as our pid namespace
    sees it: the process's own pid when the plan has no sandbox, None when the sandbox never
    started."""
    if plan.info_fd is None:
        return process.pid
    loop = asyncio.get_running_loop()
    child = await asyncio.wait_for(
        loop.run_in_executor(None, read_child_pid, plan.info_fd), timeout
    )
    if child is not None and plan.child_pid_depth:
        child = await loop.run_in_executor(
            None, outer_pid, process.pid, child, plan.child_pid_depth
        )
    return child


def outer_pid(ancestor: int, inner: int, depth: int) -> int | None:
    """The pid, as this agent sees it, of the descendant of ``ancestor`` whose pid is
    ``inner`` ``depth`` pid namespaces in (pasta starts bwrap in a pid namespace of its
    own, so bwrap's --info-fd names its child by the pid it has there). None: not found."""
    parents: dict[int, int] = {}
    nspids: dict[int, list[int]] = {}
    for pid in procfs.pids():
        fields = procfs.parent_and_nspids(pid)
        if fields is not None:
            parents[pid], nspids[pid] = fields
    for pid, ids in nspids.items():
        if len(ids) > depth and ids[depth] == inner:
            up = parents.get(pid, -1)
            for _ in range(64):  # it must descend from ancestor: never another's process
                if up == ancestor:
                    return pid
                if up <= 1:
                    break
                up = parents.get(up, -1)
    return None


_LIBC = ctypes.CDLL(None, use_errno=True)  # prctl, loaded before any fork
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec step: SIGKILL this child when the agent (``parent``) dies, even first."""

    def arm() -> None:
        if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the agent died before the signal was armed
            os._exit(1)

    return arm


def guard_file_spec(guard: GuardSpec, rlimits: Sequence[tuple[int, int]]) -> dict[str, object]:
    """What netguard reads: the interface, routes, refusals, rules and the kernel's limits."""
    return {
        "ifname": INNER_IFNAME,
        "address": guard.address,
        "routes": route_batch(guard),
        "prohibit_count": len(guard.blocked),
        "nft": nft_ruleset(guard),
        "rlimits": [list(pair) for pair in rlimits],
    }


def _child_setup(
    steps: Sequence[Callable[[], None]], rlimits: Sequence[tuple[int, int]]
) -> Callable[[], None] | None:
    """One preexec: join the cgroup, drop to the kernel's uid, then set its limits."""
    if not steps and not rlimits:
        return None
    todo = (*steps, ResourceLimits.apply_function(rlimits))

    def setup() -> None:
        for step in todo:
            step()

    return setup


def _tree(top: str) -> list[str]:
    """A folder and everything under it (not following links)."""
    out = [top]
    for root, dirs, files in os.walk(top):
        out += [os.path.join(root, name) for name in dirs + files]
    return out


def _allow_traverse(folder: str) -> None:
    """Let other users pass through one of the agent's own folders (not list or read it)."""
    info = os.stat(folder)
    if info.st_uid == os.geteuid() and not info.st_mode & 0o001:
        os.chmod(folder, (info.st_mode & 0o7777) | 0o111)


def usable_by_others(path: str, mode: int) -> bool:
    """Tell whether a user with no group in common could reach ``path`` with ``mode``."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for depth in range(1, len(parts)):
        folder = os.sep.join(parts[:depth]) or os.sep
        try:
            if not os.stat(folder).st_mode & 0o001:
                return False
        except OSError:
            return False
    try:
        st_mode = os.stat(path).st_mode
    except OSError:
        return False
    need = (0o004 if mode & os.R_OK else 0) | (0o002 if mode & os.W_OK else 0)
    if mode & os.X_OK:
        need |= 0o001
    return st_mode & need == need


def make_sandbox(
    kind: str,
    limits: ResourceLimits | None = None,
    extra_ro_paths: Sequence[str] = (),
    network: str | NetworkPolicy = "host",
    uid_pool: UidPool | None = None,
    cgroup_limits: CgroupLimits | None = None,
) -> Sandbox:
    """Build the sandbox ``kind`` ("bwrap" or "none")."""
    if kind == "bwrap":
        return BwrapSandbox(
            limits,
            extra_ro_paths=extra_ro_paths,
            network=network,
            uid_pool=uid_pool,
            cgroup_limits=cgroup_limits,
        )
    if kind == "none":
        return Sandbox(limits)
    raise ValueError(f"unknown sandbox {kind!r}: use 'bwrap' or 'none'")
