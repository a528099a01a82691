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

import json
import logging
import os
import resource
import shutil
import site
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec

log = logging.getLogger(__name__)

SANDBOX_HOME = "/home/renter"
SANDBOX_RUN = "/run/gpu-share"
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

    def __post_init__(self) -> None:
        if self.memory_rlimit not in MEMORY_RLIMITS:
            raise ValueError(f"memory_rlimit must be 'as' or 'data', not {self.memory_rlimit!r}")
        for name in ("memory_mib", "max_processes", "max_open_files"):
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
        return out

    def preexec(self) -> Callable[[], None] | None:
        """Return a function that applies the limits in the child, or None without limits."""
        limits = self.rlimits()
        if not limits:
            return None

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
            cwd=scratch_dir,
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
        network: str = "host",
    ) -> None:
        super().__init__(limits)
        if network not in ("host", "none"):
            raise ValueError(f"network must be 'host' or 'none', not {network!r}")
        # "none": the kernel's own network namespace with only its loopback (the host's
        # loopback, LAN and internet are out of reach); its channels are Unix sockets.
        self.network = network
        self.bwrap = bwrap or shutil.which("bwrap") or ""
        self.extra_ro_paths = [os.path.abspath(p) for p in extra_ro_paths]
        self.python = python
        self.as_root = os.geteuid() == 0
        self.uid = NOBODY if self.as_root else os.getuid()
        self.gid = NOBODY if self.as_root else os.getgid()
        self._ro_paths = _prune_nested(python_paths(python) + self.extra_ro_paths)

    @staticmethod
    def available() -> bool:
        """Tell whether bwrap is on PATH."""
        return shutil.which("bwrap") is not None

    def check(self) -> None:
        """Raise SandboxError unless bwrap is installed and can build a sandbox here."""
        if not self.bwrap or not os.access(self.bwrap, os.X_OK):
            raise SandboxError(INSTALL_HINT)
        argv = [self.bwrap, *self._namespace_args(), *self._system_args(), "--", "true"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SandboxError(f"bwrap could not run: {err}") from None
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise SandboxError(
                "bwrap is installed but cannot create a sandbox here"
                f" ({detail[-1] if detail else f'exit code {done.returncode}'}); "
                "allow user namespaces or pass --no-sandbox"
            )

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
        if self.network == "none":
            args.append("--unshare-net")
        if self.as_root:
            # Root outside: run as nobody in a user namespace, with no capabilities.
            args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
            args += ["--cap-drop", "ALL"]
        return args

    def _system_args(self) -> list[str]:
        args: list[str] = []
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for name in ETC_ENTRIES:
            path = os.path.join("/etc", name)
            if os.path.lexists(path) and os.path.exists(path):
                args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
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
        """Return the bwrap command line that runs the kernel."""
        passwd, group = _passwd(self.uid, self.gid)
        for name, text in (("passwd", passwd), ("group", group)):
            with open(os.path.join(runtime_dir, name), "w", encoding="ascii") as fh:
                fh.write(text)
        inner_cf = f"{SANDBOX_RUN}/kernel.json"
        args = [self.bwrap, *self._namespace_args(), *self._system_args()]
        args += ["--ro-bind", os.path.join(runtime_dir, "passwd"), "/etc/passwd"]
        args += ["--ro-bind", os.path.join(runtime_dir, "group"), "/etc/group"]
        for device in gpu_device_paths(gpu_minors):
            args += ["--dev-bind", device, device]
        # The scratch first: the interpreter's folders may lie under /tmp (a venv) and
        # must be mounted on top of it, not hidden by it.
        args += ["--bind", scratch_dir, SANDBOX_HOME, "--bind", scratch_dir, "/tmp"]
        for path in self._ro_paths:
            args += ["--ro-bind", path, path]
        inner_file, socket_binds = self._inner_connection_file(connection_file, self.network)
        args += [*socket_binds, "--ro-bind", inner_file, inner_cf]
        inner_env = dict(env)
        inner_env.pop("JPY_PARENT_PID", None)  # --die-with-parent does that job
        inner_env.update(
            HOME=SANDBOX_HOME,
            TMPDIR="/tmp",
            USER="nobody" if self.as_root else "renter",
            LOGNAME="nobody" if self.as_root else "renter",
            PATH=os.pathsep.join([os.path.dirname(python), "/usr/local/bin", "/usr/bin", "/bin"]),
        )
        args += ["--chdir", SANDBOX_HOME, "--clearenv"]
        for name, value in sorted(inner_env.items()):
            args += ["--setenv", name, value]
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        args += ["--info-fd", str(write_fd), "--", *kernel_argv(python, inner_cf)]
        return LaunchPlan(
            argv=args,
            env={"PATH": os.environ.get("PATH", os.defpath)},
            cwd="/",
            preexec=self.limits.preexec(),
            pass_fds=(write_fd,),
            info_fd=read_fd,
            sandboxed=True,
        )


def make_sandbox(
    kind: str,
    limits: ResourceLimits | None = None,
    extra_ro_paths: Sequence[str] = (),
    network: str = "host",
) -> Sandbox:
    """Build the sandbox ``kind`` ("bwrap" or "none")."""
    if kind == "bwrap":
        return BwrapSandbox(limits, extra_ro_paths=extra_ro_paths, network=network)
    if kind == "none":
        return Sandbox(limits)
    raise ValueError(f"unknown sandbox {kind!r}: use 'bwrap' or 'none'")
