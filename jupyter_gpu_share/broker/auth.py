"""Bearer-token identity and a deny-by-default authorizer for the broker's server."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

AUTH_RESOURCE = "gpu-share"
ROLES = ("user", "host", "teacher", "admin")


@dataclass
class BrokerUser(User):
    """A jupyter_server user carrying the broker account's role."""

    role: str = "user"
    account_id: int = 0


def bearer_token(handler: web.RequestHandler) -> str | None:
    """Return the token from an ``Authorization: Bearer`` (or ``token``) header."""
    header = handler.request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return None


class BrokerIdentityProvider(IdentityProvider):
    """Authenticate every request by a broker token; no cookies, no login page."""

    def get_user(self, handler: web.RequestHandler) -> User | None:
        """Look the bearer token up in the store (or the bootstrap admin token)."""
        token = bearer_token(handler)
        if token is None:
            return None
        broker = handler.settings.get("gpu_share_broker")
        if broker is None:
            return None
        account = broker.authenticate(token)
        if account is None:
            return None
        # Token auth is explicit, so xsrf and origin checks do not apply (as for jupyter_server's
        # own token auth).
        handler._token_authenticated = True  # type: ignore[attr-defined]
        return BrokerUser(
            username=account.name,
            name=account.name,
            display_name=account.name,
            role=account.role,
            account_id=account.id,
        )

    @property
    def auth_enabled(self) -> bool:
        return True

    @property
    def login_available(self) -> bool:
        return False

    def validate_security(self, app: Any, ssl_options: dict | None = None) -> None:
        """Nothing to validate: tokens live in the broker's store."""


class BrokerAuthorizer(Authorizer):
    """Allow only the broker's own handlers; jupyter_server's kernels, contents, terminals... never.

    The broker runs on a stock jupyter_server. Without this, any valid renter token could reach
    /api/kernels and run code on the broker machine.
    """

    def is_authorized(
        self, handler: web.RequestHandler, user: User, action: str, resource: str
    ) -> bool:
        """Allow the gpu-share resource; refuse every other resource of the server."""
        return resource == AUTH_RESOURCE


def same_token(given: str, expected: str) -> bool:
    """Compare two tokens in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())
