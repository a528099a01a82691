"""Bearer-token identity and a deny-by-default authorizer for the broker's server."""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web
from tornado.log import access_log, app_log, gen_log

AUTH_RESOURCE = "gpu-share"
ROLES = ("user", "host", "teacher", "admin")

# A query parameter whose name holds one of these words (as jupyter_server scrubs its access
# log), and anything that looks like a gs_ token wherever it is.
_SECRET_PARAM = re.compile(
    r"([?&;][^=&\s]*(?:token|auth|key|secret|password)[^=&\s]*=)[^&\s'\"]*", re.I
)
_GS_TOKEN = re.compile(r"gs_[A-Za-z0-9_-]{8,}")


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


def scrub_tokens(text: str) -> str:
    """Replace token values in URLs, and gs_ tokens anywhere, with ``[secret]``."""
    return _GS_TOKEN.sub("gs_[secret]", _SECRET_PARAM.sub(r"\1[secret]", text))


class TokenScrubber(logging.Filter):
    """Rewrite log records so no token a client put in a URL reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub the record's message (formatted with its arguments) and keep the record."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        scrubbed = scrub_tokens(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def scrub_token_logs(*loggers: logging.Logger | None) -> None:
    """Add a TokenScrubber (once) to tornado's loggers and ``loggers``.

    Tornado logs the full request URI of a refused request ("401 GET /path?token=...");
    jupyter_server scrubs its own access log, but not tornado's warnings.
    """
    for logger in (gen_log, app_log, access_log, *loggers):
        if logger is not None and not any(isinstance(f, TokenScrubber) for f in logger.filters):
            logger.addFilter(TokenScrubber())


class BrokerIdentityProvider(IdentityProvider):
    """Authenticate every request by a broker token; no cookies, no login page."""

    def __init__(self, **kwargs: Any) -> None:
        """Set up the provider and keep tokens in request URLs out of the server's logs."""
        super().__init__(**kwargs)
        scrub_token_logs(self.log)

    async def get_user(self, handler: web.RequestHandler) -> User | None:  # type: ignore[override]
        """Look the bearer token up in the store (or the bootstrap admin token)."""
        token = bearer_token(handler)
        if token is None:
            return None
        broker = handler.settings.get("gpu_share_broker")
        if broker is None:
            return None
        account = await broker.authenticate(token)
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
