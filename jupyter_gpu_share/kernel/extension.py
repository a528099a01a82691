"""The user-side jupyter_server extension.

It serves the lab extension's REST calls under ``/gpu-share/user/`` by calling the broker with
the user's token, so the token never reaches the browser, and turns Nagle off on the
server's kernel websockets (a 40 ms stall per round trip otherwise, local kernels included).
"""

from __future__ import annotations

import json
import os
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from ..client import BROKER_URL_ENV, TOKEN_ENV, BrokerError, broker_request

AUTH_RESOURCE = "gpu-share"


class GPUShareUser(LoggingConfigurable):
    """Where the user's broker is and the user's token (read by the server, never sent to the browser)."""

    broker_url = Unicode(config=True, help=f"Broker URL. Environment: {BROKER_URL_ENV}.")

    @default("broker_url")
    def _broker_url_default(self) -> str:
        return os.environ.get(BROKER_URL_ENV, "")

    token = Unicode(config=True, help=f"The user's broker token. Environment: {TOKEN_ENV}.")

    @default("token")
    def _token_default(self) -> str:
        return os.environ.get(TOKEN_ENV, "")

    @property
    def configured(self) -> bool:
        return bool(self.broker_url and self.token)


class UserProxyHandler(APIHandler):
    """Forward a read or a stop to the broker with the user's own token."""

    auth_resource = AUTH_RESOURCE

    @property
    def user_side(self) -> GPUShareUser:
        return self.settings["gpu_share_user"]

    async def _forward(self, method: str, path: str) -> None:
        if not self.user_side.configured:
            raise web.HTTPError(
                503, f"no broker configured: set {BROKER_URL_ENV} and {TOKEN_ENV} for this server"
            )
        try:
            answer = await broker_request(
                self.user_side.broker_url, self.user_side.token, method, path
            )
        except BrokerError as error:
            raise web.HTTPError(
                error.status if 400 <= error.status < 500 else 502, error.message
            ) from None
        self.finish(json.dumps(answer))

    @web.authenticated
    async def get(self, path: str) -> None:
        await self._forward("GET", "/" + path)

    @web.authenticated
    async def delete(self, path: str) -> None:
        if not path.startswith("sessions/"):
            raise web.HTTPError(405, "only sessions can be stopped")
        await self._forward("DELETE", "/" + path)


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
    """Register the /gpu-share/user/ routes and the websocket fix."""
    user_side = GPUShareUser(parent=serverapp)
    web_app = serverapp.web_app
    web_app.settings["gpu_share_user"] = user_side
    route = url_path_join(
        web_app.settings["base_url"], r"/gpu-share/user/(offers|me|sessions(?:/s-[0-9a-f]+)?)"
    )
    web_app.add_handlers(".*$", [(route, UserProxyHandler)])
    _turn_off_nagle_on_kernel_websockets()
    if user_side.configured:
        serverapp.log.info("gpu-share: remote GPU kernels through %s", user_side.broker_url)
    else:
        serverapp.log.info(
            "gpu-share: no broker configured (%s, %s); the 'gpu-share' kernel will say so if started",
            BROKER_URL_ENV,
            TOKEN_ENV,
        )
