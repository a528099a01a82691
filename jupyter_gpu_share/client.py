"""Small clients of the broker's REST API: a blocking one for the CLI, an async one for servers."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.request
import weakref
from typing import Any
from urllib.parse import urlsplit

import httpx

from .transport import tls

BROKER_URL_ENV = "GPU_SHARE_BROKER_URL"
TOKEN_ENV = "GPU_SHARE_TOKEN"
API = "/gpu-share/api"


class BrokerError(Exception):
    """The broker refused a request, or could not be reached; ``message`` is for people."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def normalise_broker_url(url: str) -> str:
    """Check a broker URL and drop a trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:  # urlsplit lowers the scheme
        raise BrokerError(0, f"broker URL must look like http(s)://HOST:PORT, not {url!r}")
    return parts.geturl().rstrip("/")


def websocket_url(broker_url: str, path: str) -> str:
    """The ws(s):// URL of a broker path."""
    base = normalise_broker_url(broker_url)
    return ("wss" + base[5:] if base.startswith("https") else "ws" + base[4:]) + path


def _error_from(status: int, body: bytes) -> BrokerError:
    try:
        message = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    return BrokerError(status, message or f"broker answered HTTP {status}")


class BrokerClient:
    """Blocking broker client (urllib), for the command line."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
        ca_file: str | None = None,
    ):
        url = url or os.environ.get(BROKER_URL_ENV)
        token = token or os.environ.get(TOKEN_ENV)
        if not url:
            raise BrokerError(0, f"no broker URL: pass --broker URL or set {BROKER_URL_ENV}")
        if not token:
            raise BrokerError(0, f"no token: pass --token TOKEN or set {TOKEN_ENV}")
        self.url = normalise_broker_url(url)
        self.token = token
        self.timeout = timeout
        try:  # https: certificates verified, against the system's CAs and ca_file
            self.ssl_context = tls.context_for(self.url, ca_file)
        except tls.TLSConfigError as error:
            raise BrokerError(0, str(error)) from None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request to the broker's API and return its JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + API + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self.ssl_context
            ) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise _error_from(error.code, error.read()) from None
        except (urllib.error.URLError, OSError) as error:
            refused = tls.describe(error, self.url)
            if refused is not None:
                raise BrokerError(0, refused) from None
            reason = getattr(error, "reason", error)
            raise BrokerError(0, f"cannot reach the broker at {self.url}: {reason}") from None
        return json.loads(payload) if payload else None


# One pool of kept-alive connections per event loop and broker: a request to a broker that
# was asked anything in the last minute opens no connection (over a slow link, a TCP and a
# TLS handshake are a round trip each).
_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)
KEEP_ALIVE_S = 60.0


def _pool(base: str, context: ssl.SSLContext | None) -> httpx.AsyncClient:
    clients = _POOLS.setdefault(asyncio.get_running_loop(), {})
    key = (base, id(context))
    client = clients.get(key)
    if client is None or client.is_closed:
        client = clients[key] = httpx.AsyncClient(
            verify=context if context is not None else True,
            trust_env=False,  # no proxy or CA from the environment: ours are explicit
            limits=httpx.Limits(max_keepalive_connections=8, keepalive_expiry=KEEP_ALIVE_S),
        )
    return client


def broker_urls(urls: str) -> list[str]:
    """The brokers of a comma-separated list (one service), in order."""
    return [url.strip() for url in urls.split(",") if url.strip()]


class _NotSent(BrokerError):
    """The broker could not be reached: the request never left (safe to send elsewhere)."""


async def broker_request(
    url: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 30,
    ca_file: str | None = None,
) -> Any:
    """Send one request to the broker's API from an event loop, on a kept-alive connection
    (https: certificates verified against the system's CAs and ``ca_file`` or
    ``GPU_SHARE_CA_FILE``). ``url`` may list several brokers of one service, comma-separated:
    a request that could not reach one (no connection) goes to the next; one that may have
    been received (a timeout, a connection lost after sending) is never sent twice."""
    urls = broker_urls(url) or [url]
    for index, one in enumerate(urls):
        try:
            return await _request_one(one, token, method, path, body, timeout, ca_file)
        except _NotSent:
            if index == len(urls) - 1:
                raise
    raise AssertionError("unreachable")


async def _request_one(
    url: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    timeout: float,
    ca_file: str | None,
) -> Any:
    try:
        context = tls.context_for(url, ca_file)
    except tls.TLSConfigError as error:
        raise BrokerError(0, str(error)) from None
    base = normalise_broker_url(url)
    try:
        response = await _pool(base, context).request(
            method,
            base + API + path,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            content=None if body is None else json.dumps(body).encode(),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 20)),
        )
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:  # nothing was sent
        refused = tls.describe(error, url)
        reason = str(error) or type(error).__name__
        raise _NotSent(0, refused or f"cannot reach the broker at {url}: {reason}") from None
    except httpx.TimeoutException:
        raise BrokerError(0, f"the broker at {url} did not answer within {timeout:g} s") from None
    except (httpx.HTTPError, OSError) as error:
        refused = tls.describe(error, url)
        reason = str(error) or type(error).__name__
        raise BrokerError(0, refused or f"cannot reach the broker at {url}: {reason}") from None
    if response.status_code >= 400:
        raise _error_from(response.status_code, response.content or b"")
    return json.loads(response.content) if response.content else None
