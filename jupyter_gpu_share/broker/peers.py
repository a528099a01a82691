"""Asking the broker that serves a host (several brokers on one store, issue 17).

A host is served by the one broker it is connected to (its lease, ``ownership.py``). A
user may reach any broker: a request about that host's sessions (a start placed on one of
its offers, a session's state, a stop) is sent on to the serving broker at its
``public_url``, with the user's own ``Authorization`` header, and its answer comes back
as it is. Why HTTP and not PostgreSQL's LISTEN/NOTIFY: a start needs an answer (the
session, or the refusal: 402, 409), with its status, within the user's request; HTTP
gives that, authorizes with the user's token (no secret between brokers), and needs
nothing the relay does not need anyway (the serving broker must be reachable for the
kernel's messages). See docs/design-notes.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from ..transport import tls

log = logging.getLogger("jupyter_gpu_share")

# Set on a request one broker sends on to another: the other answers it itself (a host
# that moved meanwhile is a 503 to retry, never a second hop).
FORWARDED_BY = "X-GPU-Share-Forwarded-By"
# What of the serving broker's answer comes back to the user.
PASSED_HEADERS = ("Content-Type", "Location", "Retry-After", "WWW-Authenticate")
# Below the user side's own 30 s: the user learns what happened rather than timing out.
PEER_TIMEOUT_S = 20.0
MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """The serving broker's answer, to pass on."""

    status: int
    headers: dict[str, str]
    body: bytes


class PeerUnreachable(Exception):
    """The serving broker did not answer. ``sent``: the request may have reached it (a
    timeout after sending: a start may have happened), else it surely did not (no
    connection: safe to send elsewhere or again)."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.sent = sent


class AnswerTooLarge(Exception):
    """The serving broker's answer passed MAX_ANSWER_BYTES."""


_clients: dict[tuple[int, str], httpx.AsyncClient] = {}


def _client(base: str) -> httpx.AsyncClient:
    """One kept-alive client per event loop and scheme (TLS: the system's CAs and
    ``GPU_SHARE_CA_FILE``, as the other clients of a broker)."""
    loop = asyncio.get_running_loop()
    scheme = base.split(":", 1)[0]
    key = (id(loop), scheme)
    client = _clients.get(key)
    if client is None or client.is_closed:
        context = tls.context_for(base)
        client = _clients[key] = httpx.AsyncClient(
            verify=context if context is not None else True,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
    return client


async def forward(
    base_url: str,
    method: str,
    path: str,
    *,
    authorization: str,
    broker_id: str,
    body: dict[str, Any] | None = None,
    timeout: float = PEER_TIMEOUT_S,
) -> Answer:
    """Send a user's request on to the broker at ``base_url`` and return its answer."""
    headers = {"Authorization": authorization, FORWARDED_BY: broker_id}
    content = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        content = json.dumps(body).encode()
    url = base_url.rstrip("/") + path
    try:
        client = _client(base_url)
        request = client.build_request(
            method,
            url,
            headers=headers,
            content=content,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        )
        response = await client.send(request, stream=True)
        try:
            body = bytearray()
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(f"over {MAX_ANSWER_BYTES} bytes")
        finally:
            await response.aclose()
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, tls.TLSConfigError, ValueError) as error:
        log.error("cannot send %s %s to the broker at %r: %s", method, path, base_url, error)
        raise PeerUnreachable(f"its URL cannot be used: {error}", sent=False) from None
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
        reason = tls.describe(error, url) or str(error) or type(error).__name__
        log.warning(
            "the broker at %s took no connection (%s %s): %s", base_url, method, path, reason
        )
        raise PeerUnreachable(reason, sent=False) from None
    except (httpx.HTTPError, OSError) as error:
        reason = tls.describe(error, url) or str(error) or type(error).__name__
        log.warning("the broker at %s did not answer %s %s: %s", base_url, method, path, reason)
        raise PeerUnreachable(reason, sent=True) from None
    passed = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
    return Answer(response.status_code, passed, bytes(body))


async def close_clients() -> None:
    """Close this event loop's peer clients (at the broker's stop)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [k for k in _clients if k[0] == loop_id]:
        await _clients.pop(key).aclose()
