"""The ``gpu-share-provisioner``: a jupyter_client kernel provisioner for remote GPU kernels.

Lifecycle (jupyter_client calls these in order): ``pre_launch`` binds the local bridge ports;
``launch_kernel`` asks the broker for a session, attaches the bridge to its relay and waits
for the host's ready report; ``poll``/``wait`` follow the remote kernel; ``send_signal``
forwards interrupts; ``kill``/``terminate`` stop the session (and its bill); ``cleanup``
detaches, keeping the ports across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.ioloop.manager import AsyncIOLoopKernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Enum, Float, Int, Unicode, default

from ..client import (
    BROKER_URL_ENV,
    TOKEN_ENV,
    BrokerError,
    broker_request,
    broker_urls,
    websocket_url,
)
from ..files import rules, transfer
from ..files.transfer import TransferError
from ..transport.websocket import HandshakeError
from .bridge import BridgeLoop, InlineLoop, KernelBridge
from .extension import take_preference, taken_token

# A stop, a detach, or a kernel that ended itself with code 0 (as a shutdown_request asks):
# "kernel exited" when the broker's close arrives first, "exited" when the host's record
# does. A crash reads "kernel exited: died" or "died", and is an error.
EXPECTED_ENDS = frozenset({"stopped", "detached", "kernel exited", "exited"})


def unexpected_end(reason: str | None) -> bool:
    """Whether a remote kernel's end belongs in the server log as an error."""
    return reason is not None and reason not in EXPECTED_ENDS


class GPUShareProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Start the kernel on a host found by the gpu-share broker and bridge it here."""

    broker_url = Unicode(
        config=True,
        help=f"""Broker URL, e.g. https://gpus.example.org; several brokers of one service,
        comma-separated, are tried in order (the first that answers serves the start, and
        the relay fails over along the list). Environment: {BROKER_URL_ENV}.""",
    )

    @default("broker_url")
    def _broker_url_default(self) -> str:
        return os.environ.get(BROKER_URL_ENV, "")

    token = Unicode(
        config=True,
        help=f"""The renter's broker token. Environment: {TOKEN_ENV} (in a jupyter_server
        with the gpu-share extension, as the server took it out of its environment).""",
    )

    @default("token")
    def _token_default(self) -> str:
        return os.environ.get(TOKEN_ENV) or taken_token()

    gpu_model = Unicode(
        "",
        config=True,
        help="Only rent this GPU model (e.g. 'NVIDIA A100-SXM4-80GB'); empty for any.",
    )
    offer_id = Int(
        -1,
        config=True,
        help="Rent exactly this offer (its id in the marketplace); -1 for the best match.",
    )
    max_price_per_hour_micro = Int(
        -1,
        config=True,
        help="Never rent above this price per hour, in micro-credits; -1 for no cap.",
    )
    idle_limit_s = Int(
        -1,
        config=True,
        help="""Seconds the remote kernel may be idle (no cell running, its GPUs unused)
        before the broker stops it, warned 5 minutes before (its files then come back);
        0 never; -1 your account's limit (jupyter gpu-share caps --idle), else the
        broker's (30 min by default).""",
    )
    class_name = Unicode(
        "",
        config=True,
        help="Run on this class's GPU pool, charged to the class (set by class kernelspecs).",
    )
    inline_bridge = Bool(
        True,
        config=True,
        help="In jupyter_server, relay on the server's own event loop rather than a thread.",
    )
    bridge_transport = Enum(
        ["ipc", "tcp"],
        "ipc" if os.name == "posix" else "tcp",
        config=True,
        help="How the kernel manager reaches the local bridge: 'ipc' (Unix sockets in a private "
        "folder; a little faster) or 'tcp' on loopback.",
    )
    in_process_channels = Bool(
        True,
        config=True,
        help="In jupyter_server, connect the server's own kernel channels to the bridge "
        "in-process (inproc://): no socket I/O or copy between them. Other clients use the "
        "connection file's ports either way.",
    )
    start_timeout = Float(
        180.0, config=True, help="Seconds to wait for a remote kernel to become ready."
    )
    sync_files = Bool(
        True,
        config=True,
        help="""Send the notebook's folder (the kernel's working directory, as JupyterLab,
        nbclient and nbconvert give it) into the remote kernel's working folder before the
        first cell runs, and bring back what the kernel creates or changes there: before it
        shuts down, and on demand (the lab's 'Bring back files', `jupyter gpu-share sync`).
        Ignored: .git, .ipynb_checkpoints, .venv, node_modules, __pycache__ and the patterns
        of a .gpushareignore in the folder (git's syntax). A local file changed meanwhile
        is never overwritten: the kernel's copy goes beside it.""",
    )
    output_log_mib = Int(
        16,
        config=True,
        help="""MiB of a remote kernel's recent cell outputs this server keeps (the latest
        run of each of up to 200 lab cells, oldest forgotten first), so that a browser
        that comes back (a refresh, a closed laptop) finds what the cells printed
        meanwhile, and a running cell keeps streaming into its cell. 0 keeps nothing.""",
    )
    sync_max_mib = Int(
        200,
        config=True,
        help="Most MiB of files sent at start (a larger folder is refused before anything "
        "is rented: ignore its large parts in .gpushareignore, or raise this), and brought "
        "back at once.",
    )

    session: dict[str, Any] | None = None
    bridge: KernelBridge | None = None
    _folder: tuple[str, list[rules.Entry]] | None = None
    _preference: dict[str, Any] = {}  # noqa: RUF012 - replaced per launch, never mutated

    @property
    def has_process(self) -> bool:
        return self.session is not None

    def _loop(self) -> BridgeLoop | InlineLoop:
        # jupyter_server's kernel managers live on its ever-running IOLoop: relay there, with
        # no thread hop. Other clients (nbclient, sync managers) get the bridge thread.
        if self.inline_bridge and isinstance(self.parent, AsyncIOLoopKernelManager):
            return InlineLoop.get()
        return BridgeLoop.get()

    def _in_process(self, km: Any) -> bool:
        """Whether the kernel manager's sockets can reach the bridge in-process: it runs on
        jupyter_server's loop (so does the bridge), with a ZMQ context and jupyter_client's
        one place that builds channel URLs."""
        return (
            self.in_process_channels
            and isinstance(self._loop(), InlineLoop)
            and isinstance(getattr(km, "context", None), zmq.Context)
            and callable(getattr(km, "_make_url", None))
            and getattr(km, "curve_publickey", None) is None
        )

    def _channel_url(self, make_url: Callable[[str], str], channel: str) -> str:
        bridge = self.bridge
        url = bridge.inproc_urls.get(channel) if bridge is not None else None
        return url or make_url(channel)

    async def _broker(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self._loop().run(
            broker_request(self.broker_url, self.token, method, path, body)
        )

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Check the configuration and bind the local ports the kernel manager will connect to."""
        if not self.broker_url or not self.token:
            raise RuntimeError(
                f"the gpu-share kernel needs a broker: set {BROKER_URL_ENV} and {TOKEN_ENV} "
                "(or c.GPUShareProvisioner.broker_url and .token)"
            )
        km = self.parent
        if self.bridge is None:
            in_process = self._in_process(km)
            self.bridge = KernelBridge(
                self._loop(), self.bridge_transport, km.context if in_process else None
            )
            self.bridge.on_status = lambda message: self.log.warning("gpu-share: %s", message)
            self.bridge.outputs.max_bytes = self.output_log_mib * 1024 * 1024
            ports = await self._loop().run(self.bridge.bind())
            km.transport = self.bridge_transport
            km.ip = self.bridge.ip
            for name, port in ports.items():
                setattr(km, name, port)
            if in_process and not getattr(km, "_gpu_share_in_process", False):
                # jupyter_server's own channels (the lab's websockets) connect in-process;
                # the connection file keeps the ipc/tcp ports for every other client.
                km._make_url = functools.partial(self._channel_url, km._make_url)
                km._gpu_share_in_process = True
        km.write_connection_file()
        # A remote kernel that dies (host lost, budget spent) is not silently restarted on
        # another, maybe dearer, host: the lab offers the restart instead.
        km.autorestart = False
        notebook_path = (kwargs.get("env") or {}).get("JPY_SESSION_NAME")
        self._preference = take_preference(notebook_path) or {}
        self._folder = await self._scan_folder(kwargs.get("cwd"))
        kwargs = await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)
        return kwargs

    async def _scan_folder(self, cwd: Any) -> tuple[str, list[rules.Entry]] | None:
        """The files of the kernel's working directory that go to the host, listed before
        anything is rented (a folder over the limit is refused here, free)."""
        if not self.sync_files or not isinstance(cwd, str) or not os.path.isdir(cwd):
            return None
        home = os.path.realpath(os.path.expanduser("~"))
        folder = os.path.realpath(cwd)
        if folder == home or home.startswith(folder.rstrip(os.sep) + os.sep):
            self.log.warning(
                "gpu-share: the notebook's folder %s is your home folder (or holds it): "
                "nothing is sent to the remote kernel. Keep the notebook in a project folder "
                "to have its files there",
                cwd,
            )
            return None
        limit = self.sync_max_mib * 1024 * 1024
        try:
            entries, skipped = await transfer.in_thread(lambda: rules.scan(cwd, max_bytes=limit))
        except rules.TooLarge as error:
            raise RuntimeError(
                f"gpu-share: cannot send the notebook's folder {cwd} to the remote kernel: "
                f"{error}. Name what the kernel does not need in {cwd}/{rules.IGNORE_FILE} "
                "(git's patterns), or raise c.GPUShareProvisioner.sync_max_mib, or set "
                "c.GPUShareProvisioner.sync_files = False"
            ) from None
        if skipped:
            self.log.info(
                "gpu-share: not sent (links or special files): %s", ", ".join(skipped[:10])
            )
        if self.bridge is not None:
            self.bridge.files.max_bytes = limit
        return cwd, entries

    async def _send_folder(self) -> None:
        """Put the notebook's folder in the kernel's working folder before any cell runs."""
        if self._folder is None or self.bridge is None:
            return
        root, entries = self._folder
        total = sum(entry.size for entry in entries)
        self.log.info(
            "gpu-share: sending %d file(s), %s, of %s to the kernel",
            len(entries),
            rules.mib(total),
            root,
        )
        shown = [0]

        def progress(sent: int) -> None:
            if sent - shown[0] >= 16 * 1024 * 1024:  # a line for each 16 MiB sent
                shown[0] = sent
                self.log.info("gpu-share: sent %s of %s", rules.mib(sent), rules.mib(total))

        answer = await self._loop().run(
            self.bridge.files.put(root, entries, timeout=self.start_timeout, progress=progress)
        )
        self.log.info(
            "gpu-share: %s file(s), %s, are in the kernel's folder",
            answer.get("files"),
            rules.mib(int(answer.get("bytes") or 0)),
        )

    async def bring_back(self) -> dict[str, Any]:
        """Bring back what the kernel created or changed in its working folder (see
        kernel/files.py); TransferError with the reason when it cannot."""
        if self.bridge is None or self.session is None:
            raise TransferError("the kernel is not running")
        return await self._loop().run(self.bridge.files.get())

    def _session_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {}
        offer_id = self.offer_id if self.offer_id >= 0 else self._preference.get("offer_id")
        if offer_id is not None:
            request["offer_id"] = offer_id
        gpu_model = self.gpu_model or self._preference.get("gpu_model")
        if gpu_model:
            request["gpu_model"] = gpu_model
        if self.max_price_per_hour_micro >= 0:
            request["max_price_per_hour_micro"] = self.max_price_per_hour_micro
        if self.class_name:
            request["class"] = self.class_name
        if self.idle_limit_s >= 0:
            request["idle_limit_s"] = self.idle_limit_s
        return request

    async def _request_session(self) -> dict[str, Any]:
        """Ask the broker for a session, waiting in the class queue while the pool is full."""
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while True:
            try:
                return await self._broker("POST", "/sessions", self._session_request())
            except BrokerError as error:
                if error.status != 429 or asyncio.get_running_loop().time() > deadline:
                    raise
                self.log.info("gpu-share: %s", error.message)
                await asyncio.sleep(
                    min(5.0, max(0.5, deadline - asyncio.get_running_loop().time()))
                )

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Rent a session, attach the bridge to its relay, and wait for the kernel."""
        assert self.bridge is not None
        km = self.parent
        self.log.info("gpu-share: finding a host for kernel %s", self.kernel_id)
        try:
            session = await self._request_session()
        except BrokerError as error:
            raise RuntimeError(
                f"gpu-share: cannot start a remote kernel: {error.message}"
            ) from None
        self.session = session
        self.log.info(
            "gpu-share: starting kernel %s on host %s (session %s, %s micro-credits/h)",
            self.kernel_id,
            session["host_id"],
            session["id"],
            session["price_per_hour_micro"],
        )
        urls = relay_urls(session, broker_urls(self.broker_url))
        bridge = self.bridge
        try:
            await self._loop().run(
                bridge.attach(
                    urls, self.token, session["id"], km.session.key, km.session.signature_scheme
                )
            )
            await self._loop().run(bridge.wait_ready(self.start_timeout))
            await self._send_folder()
        except TransferError as error:
            await self._stop_session()
            self.session = None
            raise RuntimeError(
                f"gpu-share: the notebook's folder did not reach {session['host_id']}: {error}"
            ) from None
        except (OSError, RuntimeError, TimeoutError, HandshakeError) as error:
            await self._stop_session()
            self.session = None
            raise RuntimeError(
                f"gpu-share: the kernel on {session['host_id']} did not start: {error}"
            ) from None
        self.log.info("gpu-share: kernel %s ready on host %s", self.kernel_id, session["host_id"])
        info = km.get_connection_info()
        if bridge.kernel_key is not None:
            info["key"], info["signature_scheme"] = (
                bridge.kernel_key[0].encode(),
                bridge.kernel_key[1],
            )
        self.connection_info = info
        return info

    async def poll(self) -> int | None:
        """None while the remote kernel lives, else its exit code."""
        if self.bridge is None or self.session is None:
            return 0
        if self.bridge.ended.is_set():
            return self.bridge.exit_code if self.bridge.exit_code is not None else 1
        return None

    async def wait(self) -> int | None:
        """Wait for the remote kernel to end."""
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.1)
        if self.bridge is not None and unexpected_end(self.bridge.end_reason):
            self.log.error("gpu-share: kernel %s ended: %s", self.kernel_id, self.bridge.end_reason)
        return status

    async def send_signal(self, signum: int) -> None:
        """Forward a signal (an interrupt) to the remote kernel."""
        if signum == 0 or self.bridge is None:
            return
        if signum in (signal.SIGKILL, signal.SIGTERM):
            await self._stop_session()
            return
        await self._loop().run(self.bridge.send_control({"type": "signal", "signum": int(signum)}))

    async def kill(self, restart: bool = False) -> None:
        """Stop the remote session now; billing ends with it."""
        await self._stop_session()

    async def terminate(self, restart: bool = False) -> None:
        """Stop the remote session."""
        await self._stop_session()

    async def _stop_session(self) -> None:
        if self.session is None:
            return
        try:
            await self._broker("DELETE", f"/sessions/{self.session['id']}")
        except BrokerError as error:
            self.log.warning(
                "gpu-share: stopping session %s: %s", self.session["id"], error.message
            )
        if self.bridge is not None:
            await self._loop().run(self.bridge.mark_stopped())

    async def cleanup(self, restart: bool = False) -> None:
        """Drop the remote session; keep the local ports across a restart."""
        if self.bridge is None:
            return
        await self._stop_session()
        if restart:
            await self._loop().run(self.bridge.detach())
            await self._loop().run(self.bridge.restore_endpoints())
        else:
            await self._loop().run(self.bridge.close())
            self.bridge = None
        self.session = None

    async def shutdown_requested(self, restart: bool = False) -> None:
        """A shutdown_request went to the kernel: the bridge holds it until the kernel's
        new and changed files are back; wait for that before jupyter_client's shutdown
        clock starts (it sends SIGTERM, a stop of the session, after a few seconds)."""
        await super().shutdown_requested(restart=restart)
        if self.bridge is not None and self.session is not None:
            await self._loop().run(self.bridge.shutdown_synced())

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """A remote kernel needs a little longer than a local one to report its exit."""
        return max(recommended, 5.0)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Persist the session id alongside the base information."""
        info = await super().get_provisioner_info()
        info["session"] = self.session
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Restore the session id."""
        await super().load_provisioner_info(provisioner_info)
        self.session = provisioner_info.get("session")


def relay_urls(session: dict[str, Any], brokers: list[str]) -> list[str]:
    """Where a session's relay is, in order: at the broker that serves its host (several
    brokers on one store: the session names it), then at each broker of the list. The
    serving broker's URL is left out when it is plain text and a broker of the list is
    reached over TLS (the token goes with it)."""
    path = session["relay_path"]
    listed = [websocket_url(url, path) for url in brokers]
    serving = session.get("broker_url")
    first: list[str] = []
    if isinstance(serving, str) and serving:
        secure = urlsplit(serving).scheme.lower() == "https"
        if secure or not any(url.startswith("wss:") for url in listed):
            with contextlib.suppress(BrokerError):  # not a URL: the list alone
                first = [websocket_url(serving, path)]
    return list(dict.fromkeys(first + listed))
