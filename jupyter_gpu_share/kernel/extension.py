"""The user-side jupyter_server extension.

It serves the lab extension's REST calls under ``/gpu-share/user/`` by calling the broker with
the user's token, so the token never reaches the browser, and turns Nagle off on the
server's kernel websockets (a 40 ms stall per round trip otherwise, local kernels included).

Besides the broker proxy it answers two questions only this server can:

- ``GET /gpu-share/user/kernels/<kernel_id>``: which broker session backs a running kernel
  (asked of the kernel's provisioner), with the broker's current view of it;
- ``POST /gpu-share/user/preference``: the offer the next ``gpu-share`` kernel started for a
  notebook should rent ("Use this GPU" in the marketplace). The provisioner takes it with
  :func:`take_preference`.

A kernel that jupyter_server's idle culler (``cull_idle_timeout``) shut down is remembered, so
``GET /gpu-share/user/kernels/<kernel_id>`` still answers for it, with ``culled: true`` and its
session's final state (the lab shows a "stopped after being idle" banner).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import ensure_async, url_path_join
from tornado import web
from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from ..client import BROKER_URL_ENV, TOKEN_ENV, BrokerError, broker_request
from ..files.transfer import TransferError
from .files import describe
from .kernelspecs import install_class_kernelspec

AUTH_RESOURCE = "gpu-share"

# The broker token this server took out of its environment (see take_token_from_environment).
_TAKEN: dict[str, str] = {}


def take_token_from_environment() -> str:
    """Move GPU_SHARE_TOKEN out of os.environ into this module and return it ('' if unset).

    Every local kernel (and terminal) a jupyter_server starts inherits os.environ, so a
    notebook's code could read the user's broker token; gpu-share kernels and the
    /gpu-share/user/ routes read it from here instead (:func:`taken_token`).
    """
    token = os.environ.pop(TOKEN_ENV, "")
    if token:
        _TAKEN[TOKEN_ENV] = token
    return taken_token()


def taken_token() -> str:
    """Return the broker token this server took out of its environment, or ''."""
    return _TAKEN.get(TOKEN_ENV, "")


class GPUShareUser(LoggingConfigurable):
    """The user's broker and token (read by the server, never sent to the browser)."""

    broker_url = Unicode(config=True, help=f"Broker URL. Environment: {BROKER_URL_ENV}.")

    @default("broker_url")
    def _broker_url_default(self) -> str:
        return os.environ.get(BROKER_URL_ENV, "")

    token = Unicode(
        config=True,
        help=f"""The user's broker token. Environment: {TOKEN_ENV}, which the server takes
        out of its environment at start so its local kernels and terminals never inherit it.""",
    )

    @default("token")
    def _token_default(self) -> str:
        return os.environ.get(TOKEN_ENV) or taken_token()

    @property
    def configured(self) -> bool:
        return bool(self.broker_url and self.token)


def small_json_body(handler: APIHandler, limit: int = 4096) -> dict[str, Any]:
    """A request's small JSON object body (a few fields), or a 4xx that says why."""
    body = handler.request.body or b"{}"
    if len(body) > limit:
        raise web.HTTPError(413, f"this request's body is at most {limit} bytes")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise web.HTTPError(400, "the body is not JSON (or nested too deep)") from None
    if not isinstance(value, dict):
        raise web.HTTPError(400, "the body is a JSON object")
    return value


class UserProxyHandler(APIHandler):
    """Forward a read or a stop to the broker with the user's own token."""

    auth_resource = AUTH_RESOURCE

    @property
    def user_side(self) -> GPUShareUser:
        return self.settings["gpu_share_user"]

    async def _forward(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        if not self.user_side.configured:
            raise web.HTTPError(
                503, f"no broker configured: set {BROKER_URL_ENV} and {TOKEN_ENV} for this server"
            )
        try:
            answer = await broker_request(
                self.user_side.broker_url, self.user_side.token, method, path, body
            )
        except BrokerError as error:
            raise web.HTTPError(
                error.status if 400 <= error.status < 500 else 502, error.message
            ) from None
        self.finish(json.dumps(answer))

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        if CLASS_STOP.fullmatch(path):
            raise web.HTTPError(405, "a student's kernel is stopped with POST")
        await self._forward("GET", "/" + quote(path, safe="/@"))

    @web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        if not path.startswith("sessions/"):
            raise web.HTTPError(405, "only sessions can be stopped")
        await self._forward("DELETE", "/" + path)

    @web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        # The one write a teacher makes from the lab: stop a student's running kernel.
        if not CLASS_STOP.fullmatch(path):
            raise web.HTTPError(405, "only a class student's kernel can be stopped with POST")
        await self._forward("POST", "/" + quote(path, safe="/@"))

    @web.authenticated
    @authorized
    async def put(self, path: str) -> None:
        # The lab's Settings write the renter's spending caps, which the broker enforces.
        if path != "me/caps":
            raise web.HTTPError(405, "only your spending caps are written with PUT")
        await self._forward("PUT", "/me/caps", small_json_body(self))


# What the lab reads (and the one thing it stops) through the proxy; the broker checks roles.
CLASS_NAME = r"[A-Za-z0-9_.-]{1,58}"
CLASS_STUDENT = r"[A-Za-z0-9_.@-]{1,64}"
CLASS_STOP = re.compile(rf"classes/{CLASS_NAME}/students/{CLASS_STUDENT}/stop")
PROXIED = (
    r"offers|me|me/caps|sessions(?:/s-[0-9a-f]+)?"
    rf"|classes(?:/{CLASS_NAME}(?:/usage|/notebooks(?:/[^/]{{1,200}}\.ipynb)?"
    rf"|/students/{CLASS_STUDENT}/stop)?)?"
)


class ClassFetchHandler(APIHandler):
    """``POST``: put a class's notebooks in ``<class>/`` under the root; install the class kernel.

    What ``jupyter gpu-share class fetch NAME`` does, from the lab: a notebook the student
    already has is kept, never overwritten. Answers ``{class, kernel_name, fetched, kept}``
    with API paths (relative to the server's root).
    """

    auth_resource = AUTH_RESOURCE

    @property
    def user_side(self) -> GPUShareUser:
        return self.settings["gpu_share_user"]

    async def _broker(self, path: str) -> Any:
        try:
            return await broker_request(
                self.user_side.broker_url, self.user_side.token, "GET", path
            )
        except BrokerError as error:
            raise web.HTTPError(
                error.status if 400 <= error.status < 500 else 502, error.message
            ) from None

    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        if not self.user_side.configured:
            raise web.HTTPError(
                503, f"no broker configured: set {BROKER_URL_ENV} and {TOKEN_ENV} for this server"
            )
        if name in (".", ".."):
            raise web.HTTPError(400, "not a class name")
        record = await self._broker(f"/classes/{name}")
        folder = str(record["name"])
        if folder in (".", "..") or "/" in folder:
            raise web.HTTPError(502, "the broker answered an odd class name")
        contents = self.contents_manager
        if not await ensure_async(contents.dir_exists(folder)):
            await ensure_async(contents.save({"type": "directory"}, folder))
        fetched: list[str] = []
        kept: list[str] = []
        for entry in await self._broker(f"/classes/{name}/notebooks"):
            notebook = str(entry.get("name", ""))
            if (
                not notebook.endswith(".ipynb")
                or "/" in notebook
                or "\\" in notebook
                or notebook.startswith(".")
            ):
                self.log.warning("gpu-share: skipped class notebook %r", notebook)
                continue
            path = f"{folder}/{notebook}"
            if await ensure_async(contents.file_exists(path)):
                kept.append(path)
                continue
            content = await self._broker(f"/classes/{name}/notebooks/{quote(notebook)}")
            await ensure_async(
                contents.save({"type": "notebook", "format": "json", "content": content}, path)
            )
            fetched.append(path)
        kernel_name = str(record["kernel_name"])
        spec_dir = await asyncio.to_thread(
            install_class_kernelspec, folder, kernel_name, record.get("gpu_model")
        )
        self.log.info("gpu-share: class %s: kernel %s in %s", folder, kernel_name, spec_dir)
        self.finish(
            json.dumps(
                {
                    "class": folder,
                    "folder": folder,
                    "kernel_name": kernel_name,
                    "fetched": fetched,
                    "kept": kept,
                }
            )
        )


class KernelPreferences:
    """The offer each notebook's next ``gpu-share`` kernel should rent, as chosen in the lab."""

    max_entries = 256
    max_age_s = 600.0

    def __init__(self) -> None:
        self._by_path: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.root_dir: Path | None = None

    def set(self, path: str, choice: dict[str, Any]) -> None:
        """Remember ``choice`` (``offer_id``, ``gpu_model``) for the notebook at ``path``."""
        path = self._key(path)
        self._by_path.pop(path, None)
        self._by_path[path] = (time.monotonic(), choice)
        while len(self._by_path) > self.max_entries:
            self._by_path.popitem(last=False)

    def _key(self, path: str | None) -> str:
        """The API path (relative to the server's root) of a notebook path or an OS path."""
        if not path:
            return ""
        if os.path.isabs(path) and self.root_dir is not None:
            try:
                return Path(path).resolve().relative_to(self.root_dir.resolve()).as_posix()
            except ValueError:
                return path
        return path.lstrip("/")

    def take(self, path: str | None) -> dict[str, Any] | None:
        """Pop the choice made for ``path`` (or for any notebook), else the notebook's metadata.

        ``path`` is an API path, or the OS path jupyter_server gives the kernel as
        ``JPY_SESSION_NAME``.
        """
        path = self._key(path)
        for key in (path, ""):
            entry = self._by_path.pop(key, None)
            if entry is not None and time.monotonic() - entry[0] <= self.max_age_s:
                return dict(entry[1])
        return self._from_notebook(path)

    def _from_notebook(self, path: str | None) -> dict[str, Any] | None:
        """The ``gpu_share`` metadata saved in the notebook: reopen onto the same kind of GPU."""
        if not path or self.root_dir is None or not path.endswith(".ipynb"):
            return None
        file = (self.root_dir / path).resolve()
        if not file.is_relative_to(self.root_dir.resolve()) or not file.is_file():
            return None
        try:
            with file.open(encoding="utf-8") as handle:
                metadata = json.load(handle).get("metadata", {})
        except (OSError, ValueError, AttributeError):
            return None
        choice = metadata.get("gpu_share") if isinstance(metadata, dict) else None
        if not isinstance(choice, dict):
            return None
        model = choice.get("gpu_model")
        # A saved offer id names one host's offer at one time; the GPU model is what travels.
        return {"gpu_model": model} if isinstance(model, str) and model else None


PREFERENCES = KernelPreferences()


def take_preference(path: str | None) -> dict[str, Any] | None:
    """The session request fields chosen in the lab for the notebook at ``path``, if any.

    For the provisioner: ``path`` is the notebook path jupyter_server puts in the kernel's
    environment as ``JPY_SESSION_NAME``. Answers ``{"offer_id": int, "gpu_model": str}`` (either
    key may be missing) once per choice, or the notebook's saved ``gpu_share.gpu_model``.
    """
    return PREFERENCES.take(path)


class PreferenceHandler(APIHandler):
    """``POST {path?, offer_id, gpu_model?}``: rent this offer for the notebook's next kernel."""

    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    def post(self) -> None:
        body = self.get_json_body()
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        offer_id = body.get("offer_id")
        if not isinstance(offer_id, int) or isinstance(offer_id, bool) or offer_id < 0:
            raise web.HTTPError(400, "'offer_id' must be a non-negative integer")
        choice: dict[str, Any] = {"offer_id": offer_id}
        gpu_model = body.get("gpu_model")
        if gpu_model is not None:
            if not isinstance(gpu_model, str) or len(gpu_model) > 200:
                raise web.HTTPError(400, "'gpu_model' must be a string of at most 200 characters")
            choice["gpu_model"] = gpu_model
        path = body.get("path", "")
        if not isinstance(path, str) or len(path) > 4096:
            raise web.HTTPError(400, "'path' must be a string of at most 4096 characters")
        PREFERENCES.set(path, choice)
        self.finish(json.dumps({"path": path, **choice}))


class KernelSessionHandler(APIHandler):
    """``GET``: the broker session behind a kernel of this server, or ``remote: false``."""

    auth_resource = AUTH_RESOURCE

    @property
    def user_side(self) -> GPUShareUser:
        return self.settings["gpu_share_user"]

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        culled = CULLED.get(kernel_id)
        if culled is not None and kernel_id not in self.kernel_manager:
            await self._answer_culled(kernel_id, culled)
            return
        try:
            kernel = self.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            raise web.HTTPError(404, f"no kernel {kernel_id}") from None
        provisioner = getattr(kernel, "provisioner", None)
        session = getattr(provisioner, "session", None)
        model: dict[str, Any] = {
            "kernel_id": kernel_id,
            "kernel_name": getattr(kernel, "kernel_name", ""),
            "remote": provisioner is not None and hasattr(provisioner, "offer_id"),
            "session": None,
        }
        if isinstance(session, dict) and session.get("id"):
            model["session"] = session
            if self.user_side.configured:
                try:
                    model["session"] = await broker_request(
                        self.user_side.broker_url,
                        self.user_side.token,
                        "GET",
                        f"/sessions/{session['id']}",
                    )
                except BrokerError as error:
                    self.log.warning("gpu-share: session %s: %s", session["id"], error.message)
        self.finish(json.dumps(model))

    async def _answer_culled(self, kernel_id: str, culled: dict[str, Any]) -> None:
        """A kernel the idle culler shut down: ``culled: true`` and its session's final state."""
        session = culled.get("session")
        model: dict[str, Any] = {
            "kernel_id": kernel_id,
            "kernel_name": culled.get("kernel_name", ""),
            "remote": bool(culled.get("remote")),
            "session": session,
            "culled": True,
            "culled_at": culled.get("culled_at"),
        }
        if isinstance(session, dict) and session.get("id") and self.user_side.configured:
            try:
                model["session"] = await broker_request(
                    self.user_side.broker_url,
                    self.user_side.token,
                    "GET",
                    f"/sessions/{session['id']}",
                )
            except BrokerError as error:
                self.log.warning("gpu-share: session %s: %s", session["id"], error.message)
        self.finish(json.dumps(model))


class FilesHandler(APIHandler):
    """``POST {"kernel_id": ...}`` or ``{"session_id": ...}``: bring back what a remote
    kernel created or changed in its working folder, into the notebook's folder. The
    answer: ``files``, ``bytes``, ``conflicts`` (a local file changed meanwhile stays; the
    kernel's copy went beside it), ``message`` (one line)."""

    auth_resource = AUTH_RESOURCE

    def _provisioner(self, body: dict[str, Any]) -> Any:
        kernel_id, session_id = body.get("kernel_id"), body.get("session_id")
        if not isinstance(kernel_id, str | None) or not isinstance(session_id, str | None):
            raise web.HTTPError(400, "kernel_id and session_id are strings")
        if (kernel_id is None) == (session_id is None):
            raise web.HTTPError(400, "give kernel_id or session_id")
        for kid in list(self.kernel_manager.list_kernel_ids()):
            provisioner = getattr(self.kernel_manager.get_kernel(kid), "provisioner", None)
            session = getattr(provisioner, "session", None) or {}
            if kid == kernel_id or (session_id and session.get("id") == session_id):
                if not hasattr(provisioner, "bring_back"):
                    raise web.HTTPError(409, "not a remote gpu-share kernel")
                return provisioner
        raise web.HTTPError(404, f"no kernel here for {kernel_id or session_id}")

    @web.authenticated
    @authorized
    async def post(self) -> None:
        provisioner = self._provisioner(small_json_body(self))
        try:
            summary = await provisioner.bring_back()
        except TransferError as error:
            raise web.HTTPError(409, f"the files did not come back: {error}") from None
        summary["message"] = describe(summary)
        self.finish(json.dumps(summary))


class OutputsHandler(APIHandler):
    """``GET``: what a remote kernel's cells printed lately (their latest runs, kept while
    no browser may be there), for a notebook opened again (kernel/outputs.py)."""

    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        try:
            kernel = self.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            raise web.HTTPError(404, f"no kernel {kernel_id}") from None
        provisioner = getattr(kernel, "provisioner", None)
        log = getattr(getattr(provisioner, "bridge", None), "outputs", None)
        executions: list[dict[str, Any]] = []
        if log is not None:

            async def snapshot() -> list[dict[str, Any]]:
                return log.snapshot()  # on the bridge's loop, where the log is written

            executions = await provisioner._loop().run(snapshot())
        self.finish(json.dumps({"kernel_id": kernel_id, "executions": executions}))


class CulledKernels:
    """The kernels this server's idle culler shut down (the newest few hundred), by id.

    jupyter_server forgets a culled kernel at once; the lab asks about it afterwards to tell
    the user why the kernel went away and what its session was billed.
    """

    max_entries = 512

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, kernel_id: str, record: dict[str, Any]) -> None:
        self._by_id.pop(kernel_id, None)
        self._by_id[kernel_id] = record
        while len(self._by_id) > self.max_entries:
            self._by_id.popitem(last=False)

    def get(self, kernel_id: str) -> dict[str, Any] | None:
        return self._by_id.get(kernel_id)

    def __contains__(self, kernel_id: object) -> bool:
        return kernel_id in self._by_id


CULLED = CulledKernels()


def _remember_culled_kernels(kernel_manager: Any) -> None:
    """Wrap the kernel manager's ``cull_kernel_if_idle`` so culled kernel ids are kept in CULLED.

    A kernel counts as culled when it was alive (not ``dead``: the culler also reaps dead
    kernels) before the call and is gone from the manager after it.
    """
    original = getattr(kernel_manager, "cull_kernel_if_idle", None)
    if original is None or getattr(original, "_gpu_share_culls", False):
        return

    async def cull_kernel_if_idle(kernel_id: str) -> Any:
        kernel = kernel_manager._kernels.get(kernel_id)
        state = getattr(kernel, "execution_state", None)
        provisioner = getattr(kernel, "provisioner", None)
        session = getattr(provisioner, "session", None)
        if isinstance(session, dict):
            session = dict(session)
        record = {
            "kernel_name": getattr(kernel, "kernel_name", ""),
            "remote": provisioner is not None and hasattr(provisioner, "offer_id"),
            "session": session if isinstance(session, dict) and session.get("id") else None,
        }
        result = await ensure_async(original(kernel_id))
        if kernel is not None and state != "dead" and kernel_id not in kernel_manager:
            record["culled_at"] = time.time()
            CULLED.add(kernel_id, record)
            kernel_manager.log.info("gpu-share: kernel %s was culled for being idle", kernel_id)
        return result

    cull_kernel_if_idle._gpu_share_culls = True  # type: ignore[attr-defined]
    kernel_manager.cull_kernel_if_idle = cull_kernel_if_idle


def _turn_off_nagle_on_kernel_websockets() -> None:
    """Set TCP_NODELAY on jupyter_server's kernel websockets (idempotent)."""
    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

    if getattr(KernelWebsocketHandler, "_gpu_share_nodelay", False):
        return
    original_open = KernelWebsocketHandler.open

    async def open_with_nodelay(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.set_nodelay(True)
        return await original_open(self, *args, **kwargs)

    KernelWebsocketHandler.open = open_with_nodelay  # type: ignore[method-assign]
    KernelWebsocketHandler._gpu_share_nodelay = True  # type: ignore[attr-defined]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the /gpu-share/user/ routes and the websocket fix; hide the broker token."""
    take_token_from_environment()
    user_side = GPUShareUser(parent=serverapp)
    web_app = serverapp.web_app
    web_app.settings["gpu_share_user"] = user_side
    route = url_path_join(web_app.settings["base_url"], rf"/gpu-share/user/({PROXIED})")
    base_url = web_app.settings["base_url"]
    PREFERENCES.root_dir = Path(serverapp.root_dir)
    web_app.add_handlers(
        ".*$",
        [
            (
                url_path_join(base_url, r"/gpu-share/user/kernels/([0-9a-f-]{1,64})"),
                KernelSessionHandler,
            ),
            (url_path_join(base_url, r"/gpu-share/user/preference"), PreferenceHandler),
            (url_path_join(base_url, r"/gpu-share/user/files"), FilesHandler),
            (
                url_path_join(base_url, r"/gpu-share/user/kernels/([0-9a-f-]{1,64})/outputs"),
                OutputsHandler,
            ),
            (
                url_path_join(base_url, rf"/gpu-share/user/classes/({CLASS_NAME})/fetch"),
                ClassFetchHandler,
            ),
            (route, UserProxyHandler),
        ],
    )
    _turn_off_nagle_on_kernel_websockets()
    kernel_manager = getattr(serverapp, "kernel_manager", None)
    if kernel_manager is not None:
        _remember_culled_kernels(kernel_manager)
    if user_side.configured:
        serverapp.log.info("gpu-share: remote GPU kernels through %s", user_side.broker_url)
    else:
        serverapp.log.info(
            "gpu-share: no broker configured (%s, %s); a 'gpu-share' kernel will say so",
            BROKER_URL_ENV,
            TOKEN_ENV,
        )
