"""The broker's REST and websocket handlers: thin shells around ``Broker`` and ``Store``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web
from websockets.exceptions import PayloadTooBig

from ..clock import now_us
from ..ledger import cost_at, earnings_by_day, price_per_hour, price_per_second_from_hour
from ..ledger.caps import WARN_PERCENT, day_start_us
from ..store import (
    Conflict,
    InsufficientFunds,
    NotFound,
    StoreError,
    unavailable,
)
from ..store.caps import Caps
from ..transport.websocket import (
    ConnectionClosed,
    Message,
    WebSocketEndpoint,
)
from .auth import AUTH_RESOURCE, ROLES, BrokerUser, bearer_token
from .health import HealthHandler
from .host_messages import (
    HostMessageError,
    heartbeat_busy,
    message_kind,
    parse_control,
    validate_heartbeat,
    validate_hello,
    validate_session_report,
)
from .matching import NoMatch, SessionRequest, offer_is_free
from .openapi import openapi_document
from .peers import FORWARDED_BY, AnswerTooLarge, PeerUnreachable, forward
from .relay import CLOSE_BUFFER_FULL, USER
from .service import LIVE_STATES, Broker, Placed, Queued, Refused

log = logging.getLogger("jupyter_gpu_share.broker")

API = "/gpu-share/api"
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
INT64_MAX = 2**63 - 1  # the ledger's integers are 64-bit in both databases
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class BrokerAPIHandler(APIHandler):
    """Authenticated JSON handler: 401 without a valid token, store errors as 4xx."""

    auth_resource = AUTH_RESOURCE

    @property
    def broker(self) -> Broker:
        return self.settings["gpu_share_broker"]

    @property
    def account(self) -> BrokerUser:
        return self.current_user  # type: ignore[return-value]

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.current_user is None:
            self._unauthorized()
        wait = self.broker.rate_limited(self.account.name)
        if wait is not None:
            raise HeaderedError(
                429, f"too many requests for this token: retry in {wait} s", {"Retry-After": wait}
            )

    def _unauthorized(self) -> None:
        raise HeaderedError(
            401,
            "missing or invalid token: send 'Authorization: Bearer TOKEN'",
            {"WWW-Authenticate": 'Bearer realm="gpu-share"'},
        )

    def check_xsrf_cookie(self) -> None:
        """Bearer-token clients carry no cookies to forge; a write with no token is a 401
        (who are you), not a 403 about a missing _xsrf argument."""
        if bearer_token(self) is None:
            self._unauthorized()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """jupyter_server's JSON error, with ``Allow`` on a 405 (RFC 9110) and the headers
        an error carries (tornado clears the ones set before it was raised)."""
        if status_code == 405:
            self.set_header("Allow", ", ".join(allowed_methods(type(self))))
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, Queued):
            self.set_header("Retry-After", str(error.retry_after))
            self.set_header("Content-Type", "application/json")
            self.finish(
                json.dumps(
                    {
                        "message": str(error),
                        "reason": "queued",
                        "queue_position": error.position,
                        "retry_after": error.retry_after,
                    }
                )
            )
            return
        for name, value in getattr(error, "headers", {}).items():
            self.set_header(name, value)
        super().write_error(status_code, **kwargs)

    async def send_on(
        self, serving: tuple[str, str | None], method: str, body: dict[str, Any] | None = None
    ) -> None:
        """Answer with what the broker serving the host answers to this request (several
        brokers on one store: ``peers.py``)."""
        broker_id, url = serving
        if self.request.headers.get(FORWARDED_BY):
            raise HeaderedError(
                503, "the host moved to another broker meanwhile; try again", {"Retry-After": 1}
            )
        if not url:
            raise HeaderedError(
                503,
                f"the host is served by broker {broker_id}, which has no public URL "
                "(set BrokerApp.public_url on every broker of the store)",
                {"Retry-After": 5},
            )
        try:
            answer = await forward(
                url,
                method,
                self.request.path,
                authorization=f"Bearer {bearer_token(self)}",
                broker_id=self.broker.broker_id,
                body=body,
            )
        except PeerUnreachable as error:
            if error.sent and method == "POST":  # it may have started the session
                raise web.HTTPError(
                    504,
                    f"broker {broker_id}, which serves the host, did not answer in time; "
                    "the session may have started: see GET /sessions before asking again",
                ) from None
            if not error.sent:
                self.broker.broker_unreachable(broker_id)
            raise HeaderedError(
                503,
                f"broker {broker_id}, which serves the host, did not answer; try again",
                {"Retry-After": 2},
            ) from None
        except AnswerTooLarge:
            raise web.HTTPError(502, f"broker {broker_id} answered more than expected") from None
        self.set_status(answer.status)
        for name, value in answer.headers.items():
            self.set_header(name, value)
        self.finish(answer.body)

    def require_role(self, *roles: str) -> None:
        """Refuse the request unless the caller has one of ``roles``."""
        if self.account.role not in roles:
            raise web.HTTPError(
                403, f"this needs a {' or '.join(roles)} token, not a {self.account.role} token"
            )

    def json_body(self, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
        """Parse the request body as a JSON object, or answer 400."""
        if len(self.request.body) > max_bytes:
            raise web.HTTPError(413, f"request body over {max_bytes} bytes")
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except RecursionError:
            raise web.HTTPError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH}") from None
        except ValueError as error:  # also an integer of more than 4300 digits
            raise web.HTTPError(400, f"malformed JSON body: {str(error)[:200]}") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the JSON body must be an object")
        if json_depth(body) > MAX_JSON_DEPTH:
            raise web.HTTPError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH}")
        return body

    def write_json(self, value: Any, status: int = 200) -> None:
        """Answer with a JSON document."""
        self.set_status(status)
        self.finish(json.dumps(value))

    def log_exception(self, kind: Any, value: Any, traceback: Any) -> None:
        """Errors that are answers (a queue place, a busy store, a store refusal) are not
        logged as crashes; ``send_error`` turns them into their status."""
        if isinstance(value, Queued) or _as_http_error(value) is not None:
            return
        if unavailable(value):  # locked, gone, disk full: nothing was changed
            log.warning(
                "%s %s: store unavailable: %s", self.request.method, self.request.path, value
            )
            return
        super().log_exception(kind, value, traceback)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        mapped: web.HTTPError | None = None
        if isinstance(error, Queued):
            status_code = 429
        elif error is not None and not isinstance(error, web.HTTPError):
            if unavailable(error):
                mapped = HeaderedError(
                    503, "the broker's database is busy; try again shortly", {"Retry-After": 2}
                )
            else:
                mapped = _as_http_error(error)
        if mapped is not None:
            status_code, kwargs["exc_info"] = mapped.status_code, (type(mapped), mapped, None)
        super().send_error(status_code, **kwargs)


class HeaderedError(web.HTTPError):
    """An HTTP error with response headers of its own (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, Any]) -> None:
        super().__init__(status, message)
        self.headers = {name: str(value) for name, value in headers.items()}


def _as_http_error(error: BaseException) -> web.HTTPError | None:
    if isinstance(error, NotFound):
        return web.HTTPError(404, str(error))
    if isinstance(error, Conflict):
        return web.HTTPError(409, str(error))
    if isinstance(error, InsufficientFunds):
        return web.HTTPError(402, str(error))
    if isinstance(error, (NoMatch, Refused)):
        return web.HTTPError(error.status, error.message)
    if isinstance(error, (ValueError, StoreError)):
        return web.HTTPError(400, str(error))
    return None


def int_field(
    body: dict[str, Any],
    name: str,
    *,
    minimum: int | None = None,
    maximum: int = INT64_MAX,
    required: bool = False,
) -> int | None:
    """Read an integer field of a JSON body, answering 400 on a wrong type or range (never
    past a 64-bit integer: the ledger's columns are BIGINT)."""
    value = body.get(name)
    if value is None:
        if required:
            raise web.HTTPError(400, f"'{name}' is required")
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # 1084.0 is an integer to JSON (and JSON Schema)
    if isinstance(value, bool) or not isinstance(value, int):
        raise web.HTTPError(400, f"'{name}' must be an integer")
    if minimum is not None and value < minimum:
        raise web.HTTPError(400, f"'{name}' must be at least {minimum}")
    if value > maximum:
        raise web.HTTPError(400, f"'{name}' must be at most {maximum}")
    return value


def json_depth(value: Any) -> int:
    """How deep containers nest in a parsed JSON value (a scalar is 0), without recursion."""
    depth, level = 0, [value]
    while True:
        inner = []
        for item in level:
            if isinstance(item, dict):
                inner.extend(item.values())
            elif isinstance(item, list):
                inner.extend(item)
        if not any(isinstance(item, (dict, list)) for item in level):
            return depth
        depth += 1
        level = inner


def allowed_methods(handler_class: type[web.RequestHandler]) -> list[str]:
    """The HTTP methods a handler class implements."""
    return [
        method
        for method in HTTP_METHODS
        if getattr(handler_class, method.lower(), None)
        is not getattr(web.RequestHandler, method.lower())
    ]


def str_field(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """Read a string field of a JSON body, answering 400 on a wrong type."""
    value = body.get(name)
    if value is None:
        if required:
            raise web.HTTPError(400, f"'{name}' is required")
        return None
    if not isinstance(value, str) or not value:
        raise web.HTTPError(400, f"'{name}' must be a non-empty string")
    return value


def iso_from_us(value: int | None) -> str | None:
    """An ISO 8601 UTC time for people, from integer microseconds."""
    if value is None:
        return None
    return datetime.fromtimestamp(value / 1_000_000, tz=timezone.utc).isoformat()


def account_model(account: Any) -> dict[str, Any]:
    """The JSON of an account."""
    return {
        "name": account.name,
        "role": account.role,
        "balance_micro": account.balance_micro,
        "created_at": iso_from_us(account.created_us),
    }


def offer_model(broker: Broker, offer: Any, loads: dict[str, Any]) -> dict[str, Any]:
    """The JSON of an online offer."""
    load = loads.get(offer.host)
    free = offer_is_free(offer, load)
    details = broker.offer_details(offer)
    return {
        "id": offer.id,
        "host_id": offer.host,
        "gpu_model": offer.gpu_model,
        "gpu_count": offer.gpu_count,
        "gpu_memory_mib": offer.gpu_memory_mib,
        "price_per_second_micro": offer.price_per_second_micro,
        "price_per_hour_micro": price_per_hour(offer.price_per_second_micro),
        "state": "free" if free else "busy",
        "telemetry": details["telemetry"],
        "reliability": offer.reliability,
        "shared": offer.shared,
        "speed": details["speed"],
        # How the host isolates renters (its network above all), as the host says it does.
        "sandbox": details["sandbox"],
    }


async def session_model(broker: Broker, record: Any) -> dict[str, Any]:
    """The JSON of a session, with its cost so far while it runs.

    A session whose stop is waiting for the store is "stopping": its cost is fixed at the
    instant the stop was asked, which is what it will be billed.
    """
    if record.state in LIVE_STATES and record.id not in broker.sessions:
        # Read while its settlement committed (or another broker's): read what it is now.
        record = await broker.session_record(record.id)
    in_memory = broker.sessions.get(record.id) if record.state in LIVE_STATES else None
    if in_memory is not None and in_memory.ready_us is not None and record.ready_us is None:
        # Billing started at the host's report even if the store has not recorded it yet.
        record = replace(record, state="running", ready_us=in_memory.ready_us)
    stopping = broker.stopping_cost(record.id) if record.state in LIVE_STATES else None
    live = record.state in LIVE_STATES and stopping is None
    serving_url = broker.settings.public_url or None
    cost = broker.cost_so_far(record.id) if live else (record.amount_micro or 0)
    if live and in_memory is None:  # metered by the broker that serves its host
        await broker.hosts_elsewhere()  # as read at most a second ago
        serving_url = broker.serving_url(record.host)
        if record.ready_us is not None:
            cost = cost_at(record.ready_us, now_us(), record.price_per_second_micro)
    return {
        "id": record.id,
        "state": "stopping" if stopping is not None else record.state,
        "renter": record.renter,
        "payer": record.payer,
        "host_id": record.host,
        "offer_id": record.offer_id,
        "gpu_indices": list(record.gpu_indices),
        "price_per_second_micro": record.price_per_second_micro,
        "price_per_hour_micro": price_per_hour(record.price_per_second_micro),
        "created_at": iso_from_us(record.created_us),
        "started_at": iso_from_us(record.ready_us),
        "ended_at": iso_from_us(record.ended_us),
        "started_us": record.ready_us,
        "ended_us": record.ended_us,
        "end_reason": record.end_reason,
        "billed_seconds": record.billed_seconds,
        "amount_micro": record.amount_micro,
        "cost_so_far_micro": stopping if stopping is not None else cost,
        "relay_path": f"{API}/relay/{record.id}/user" if live else None,
        # Several brokers: where the broker that serves it is (its relay is there).
        "broker_url": serving_url if live else None,
        "class": record.class_name,
        "host_telemetry": _telemetry_of(broker, record) if live else None,
        # When the broker will stop it (quota or credit), so the lab can save the notebook first.
        "stops_at_us": (await broker.stops_at_us(record.id)) if live else None,
        # When it will be stopped for being idle, once it was warned (None: not warned).
        "idle_stop_at": iso_from_us(broker.idle_stop_us(record.id)) if live else None,
        "cell_running": broker.cell_running(record.id) if live else None,
    }


def _telemetry_of(broker: Broker, record: Any) -> dict[str, Any] | None:
    """What the host last reported about the GPUs this session rents (or its CPU)."""
    link = broker.hosts.get(record.host)
    if link is None or not link.telemetry:
        return None
    gpus = link.telemetry.get("gpus")
    if isinstance(gpus, list) and record.gpu_indices:
        wanted = set(record.gpu_indices)
        return {
            **link.telemetry,
            "gpus": [g for g in gpus if isinstance(g, dict) and g.get("index") in wanted],
        }
    return link.telemetry


class OpenAPIHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.write_json(openapi_document())


class MeHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        account = await self.broker.db.get_account(self.account.name)
        model = account_model(account)
        if account.role == "host":
            link = self.broker.hosts.get(account.name)
            model["earnings_micro"] = account.balance_micro
            model["online"] = link is not None and link.channel is not None
        else:
            running = [s for s in self.broker.sessions.values() if s.payer == account.name]
            model["running_sessions"] = len(running)
            model["available_micro"] = account.balance_micro - self.broker.committed(account.name)
        self.write_json(model)


MAX_IDLE_LIMIT_S = 7 * 86_400


class CapsHandler(BrokerAPIHandler):
    """``GET``/``PUT /me/caps``: a renter's own spending caps, enforced by every broker."""

    RENTERS = ("user", "student")

    async def _answer(self, caps: Caps) -> None:
        now = now_us()
        spent = await self.broker.spent_today(self.account.name, now)
        self.write_json(
            {
                "session_cap_micro": caps.session_micro,
                "day_cap_micro": caps.day_micro,
                "idle_limit_s": caps.idle_limit_s,
                "idle_default_s": int(self.broker.settings.idle_timeout_s),
                "spent_today_micro": spent,
                "warn_percent": WARN_PERCENT,
                "day_started_at": iso_from_us(day_start_us(now)),
            }
        )

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.require_role(*self.RENTERS)
        await self._answer(await self.broker.db.get_caps(self.account.name))

    @web.authenticated
    @authorized
    async def put(self) -> None:
        self.require_role(*self.RENTERS)
        body = self.json_body()
        unknown = set(body) - {"session_cap_micro", "day_cap_micro", "idle_limit_s"}
        if unknown:
            raise web.HTTPError(400, f"unknown field {sorted(unknown)[0]!r}")
        # A field left out keeps its value; null removes the cap (or the idle limit).
        caps = await self.broker.db.get_caps(self.account.name)
        caps = Caps(
            int_field(body, "session_cap_micro", minimum=0)
            if "session_cap_micro" in body
            else caps.session_micro,
            int_field(body, "day_cap_micro", minimum=0)
            if "day_cap_micro" in body
            else caps.day_micro,
            int_field(body, "idle_limit_s", minimum=0, maximum=MAX_IDLE_LIMIT_S)
            if "idle_limit_s" in body
            else caps.idle_limit_s,
        )
        await self.broker.db.set_caps(self.account.name, caps)
        self.broker.caps.changed()
        await self._answer(caps)


class AccountsHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.require_role("admin")
        body = self.json_body()
        name = str_field(body, "name", required=True)
        role = str_field(body, "role", required=True)
        if role not in ROLES:
            raise web.HTTPError(400, f"'role' must be one of {', '.join(ROLES)}")
        existed = await self.broker.db.get_account(name) is not None
        account = await self.broker.db.ensure_account(name, role)
        self.write_json(account_model(account), 200 if existed else 201)


class TokensHandler(BrokerAPIHandler):
    """An account's tokens (admin): issue one (optionally expiring), list them, revoke all."""

    async def _existing_account(self, name: str) -> Any:
        self.require_role("admin")
        account = await self.broker.db.get_account(name)
        if account is None:
            raise web.HTTPError(404, f"no account named {name!r}")
        return account

    @staticmethod
    def token_model(record: Any) -> dict[str, Any]:
        """The JSON of a token: its public id, times and state, never the secret."""
        return {
            "id": record.id,
            "state": record.state,
            "created_at": iso_from_us(record.created_us),
            "expires_at": iso_from_us(record.expires_us),
            "last_used_at": iso_from_us(record.last_used_us),
            "revoked_at": iso_from_us(record.revoked_us),
        }

    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        account = await self._existing_account(name)
        self.write_json(
            [self.token_model(t) for t in await self.broker.db.list_tokens(account.name)]
        )

    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        from ..store.store import token_digest

        account = await self._existing_account(name)
        # 1 s to 10 years (the store refuses longer: a ValueError, answered 400).
        expires_in_s = int_field(self.json_body(), "expires_in_s", minimum=1)
        token = await self.broker.db.issue_token(account.name, expires_in_s=expires_in_s)
        self.write_json(
            {
                "name": account.name,
                "role": account.role,
                "token": token,
                "id": token_digest(token)[:8],
                "expires_in_s": expires_in_s,
            },
            201,
        )

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        account = await self._existing_account(name)
        revoked = await self.broker.db.revoke_tokens(account.name)
        self.write_json({"name": account.name, "revoked": revoked})


class CreditHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        self.require_role("admin")
        body = self.json_body()
        amount = int_field(body, "amount_micro", required=True)
        if amount is None or amount <= 0:
            raise web.HTTPError(400, "'amount_micro' must be a positive integer")
        if await self.broker.db.get_account(name) is None:
            raise web.HTTPError(404, f"no account named {name!r}")
        account = await self.broker.db.credit(name, amount, str(body.get("memo") or "admin credit"))
        self.broker.credited(name, account.balance_micro)
        self.write_json(account_model(account))


class OffersHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        offers = sorted(
            await self.broker.online_offers(), key=lambda o: (o.price_per_second_micro, o.id)
        )
        loads = self.broker.host_loads()
        self.write_json([offer_model(self.broker, o, loads) for o in offers])


class SessionsHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        limit = self.get_query_argument("limit", "200")
        if not limit.isdigit() or not 0 < int(limit) <= 10_000:
            raise web.HTTPError(400, "'limit' must be a whole number from 1 to 10000")
        state = self.get_query_argument("state", None)
        if state is not None and state not in ("starting", "running", "ended"):
            raise web.HTTPError(400, "'state' must be starting, running or ended")
        query: dict[str, Any] = {"limit": int(limit), "states": None if state is None else [state]}
        if self.account.role == "host":
            query["host"] = self.account.name
        elif self.account.role != "admin":
            query["renter"] = self.account.name
        records = await self.broker.db.list_sessions(**query)
        self.write_json([await session_model(self.broker, r) for r in records])

    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.require_role("user")
        body = self.json_body()
        max_price_hour = int_field(body, "max_price_per_hour_micro", minimum=0)
        min_reliability = body.get("min_reliability")
        if min_reliability is not None and (
            isinstance(min_reliability, bool)
            or not isinstance(min_reliability, (int, float))
            or not 0 <= min_reliability <= 1
        ):
            raise web.HTTPError(400, "'min_reliability' must be a number between 0 and 1")
        request = SessionRequest(
            min_reliability=min_reliability,
            offer_id=int_field(body, "offer_id", minimum=0),
            gpu_model=str_field(body, "gpu_model"),
            min_gpu_memory_mib=int_field(body, "min_gpu_memory_mib", minimum=0),
            max_price_per_second_micro=(
                None if max_price_hour is None else price_per_second_from_hour(max_price_hour)
            ),
        )
        class_name = str_field(body, "class")
        # How long it may run with no client connected (a long cell, the laptop closed).
        keep_alive = int_field(
            body,
            "keep_alive_s",
            minimum=1,
            maximum=int(self.broker.settings.orphan_max_keep_alive_s),
        )
        # How long it may be idle before it is stopped (0: never).
        idle_limit = int_field(body, "idle_limit_s", minimum=0, maximum=MAX_IDLE_LIMIT_S)
        forwarded = bool(self.request.headers.get(FORWARDED_BY))
        for attempt in range(2):
            try:
                record = await self.broker.start_session(
                    self.account.name, request, class_name, keep_alive, idle_limit
                )
            except Placed as placed:  # on a host another broker serves: that broker starts it
                pinned = {**body, "offer_id": placed.offer_id}
                try:
                    await self.send_on((placed.broker_id, placed.url), "POST", pinned)
                except HeaderedError:
                    if attempt or forwarded or not self.broker.unreachable(placed.broker_id):
                        raise
                    continue  # that broker took no connection: match again without it
                return
            except NoMatch as error:
                if forwarded and error.status in (404, 409):
                    # The offer the other broker chose went (offline, taken) meanwhile.
                    raise HeaderedError(
                        503, "the chosen offer was taken meanwhile; try again", {"Retry-After": 1}
                    ) from None
                raise
            break
        self.set_header("Location", f"{self.base_url.rstrip('/')}{API}/sessions/{record.id}")
        self.write_json(await session_model(self.broker, record), 201)


class SessionHandler(BrokerAPIHandler):
    async def _visible_session(self, session_id: str) -> Any:
        try:
            record = await self.broker.session_record(session_id)
        except NotFound:
            record = None
        role, name = self.account.role, self.account.name
        allowed = record is not None and (
            role == "admin"
            or (role == "user" and record.renter == name)
            or (role == "host" and record.host == name)
        )
        if not allowed:
            # The same answer whether it does not exist or is someone else's.
            raise web.HTTPError(404, f"no session {session_id!r}")
        return record

    async def _served_elsewhere(self, record: Any) -> tuple[str, str | None] | None:
        """The other broker that serves a running session's host (None: this one)."""
        if record.state not in LIVE_STATES or record.id in self.broker.sessions:
            return None
        return await self.broker.serving_broker(record.host)

    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        record = await self._visible_session(session_id)
        serving = await self._served_elsewhere(record)
        if serving is not None:  # its cost so far and its stop are known there
            await self.send_on(serving, "GET")
            return
        self.write_json(await session_model(self.broker, record))

    @web.authenticated
    @authorized
    async def delete(self, session_id: str) -> None:
        record = await self._visible_session(session_id)
        if self.account.role == "host":
            raise web.HTTPError(
                403, "a host ends sessions by stopping the kernel, not through the API"
            )
        serving = await self._served_elsewhere(record)
        if serving is not None:  # that broker stops it and settles it
            await self.send_on(serving, "DELETE")
            return
        ended = await self.broker.stop_session(record.id)
        if ended is None:  # the kernel is stopped; the settlement waits for the store
            self.write_json(await session_model(self.broker, record), status=202)
            return
        self.write_json(await session_model(self.broker, ended))


class EarningsHandler(BrokerAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.require_role("host")
        rows = await self.broker.db.earnings(self.account.name)
        sessions = [
            {
                "session_id": row["id"],
                "started_at": iso_from_us(row["ready_us"]),
                "ended_at": iso_from_us(row["ended_us"]),
                "billed_seconds": row["billed_seconds"],
                "renter_paid_micro": row["amount_micro"],
                "earned_micro": row["host_micro"],
            }
            for row in rows
        ]
        days = earnings_by_day(
            [(row["ended_us"], row["billed_seconds"], row["host_micro"]) for row in rows]
        )
        reliability = await self.broker.host_reliability(self.account.name)
        self.write_json(
            {
                "host": self.account.name,
                "total_micro": sum(row["host_micro"] for row in rows),
                "balance_micro": await self.broker.db.balance(self.account.name),
                "sessions": sessions,
                "days": days,
                "reliability": reliability.score,
                "uptime": reliability.uptime,
            }
        )


class BrokerWebSocket(WebSocketEndpoint, APIHandler):
    """An authenticated websocket with large messages and Nagle off; a refused upgrade
    is a JSON error, as from any API route."""

    auth_resource = AUTH_RESOURCE

    @property
    def broker(self) -> Broker:
        return self.settings["gpu_share_broker"]

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        return int(self.settings.get("gpu_share_max_message_size", 256 * 1024 * 1024))

    def check_xsrf_cookie(self) -> None:
        """Bearer-token clients carry no cookies to forge."""

    def check_websocket_origin(self, origin: str) -> bool:
        return self.check_origin(origin)  # jupyter_server's allow_origin rules

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """jupyter_server's JSON error, with the headers the error carries (Retry-After)."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        for name, value in getattr(error, "headers", {}).items():
            self.set_header(name, value)
        super().write_error(status_code, **kwargs)

    def authenticated_account(self) -> BrokerUser:
        """The caller, or 401 before the upgrade."""
        user = self.current_user
        if user is None:
            raise web.HTTPError(401, "missing or invalid token")
        if not self.authorizer.is_authorized(self, user, "execute", AUTH_RESOURCE):
            raise web.HTTPError(403)
        return user  # type: ignore[return-value]


CLOSE_BAD_MESSAGE = 4400  # a hello that breaks the rules, or a message that is not JSON
CLOSE_NO_HELLO = 4408  # authenticated, but no hello in time


class HostControlHandler(BrokerWebSocket):
    """A host agent's outbound control channel.

    Each message is parsed under a size cap and checked field by field
    (``host_messages``); a refused one gets an ``error`` message back and one log line.
    A bad hello closes the connection; a bad heartbeat still says the host is alive, but
    its telemetry is dropped.
    """

    host_name: str | None = None
    _closing = False
    _hello_seen = False

    @property
    def max_message_size(self) -> int:
        """The largest frame read at all: the larger of the hello and heartbeat caps."""
        limits = self.broker.settings
        return max(limits.host_hello_max_bytes, limits.host_heartbeat_max_bytes)

    def refusal(self, error: PayloadTooBig) -> str:
        """A control message over the size cap is refused in words, then closed (1009)."""
        refusal = (
            f"refused control message over {self.max_message_size} bytes; closing the connection"
        )
        log.warning("host %s: %s", self.host_name, refusal)
        return json.dumps({"type": "error", "message": refusal})

    async def get(self, *args: Any, **kwargs: Any) -> None:
        account = self.authenticated_account()
        if account.role != "host":
            raise web.HTTPError(403, "only a host token can connect as a host")
        self.host_name = account.name
        await super().get(*args, **kwargs)

    def on_messages(self, messages: list[Message]) -> None:
        for _, payload in messages:  # text or binary: parse_control decodes UTF-8 itself
            self.on_message(bytes(payload))

    def _refuse(self, kind: str, error: HostMessageError | str) -> None:
        """Tell the host why its message was refused, and log it in one line."""
        message = f"refused {kind} message: {error}"
        log.warning("host %s: %s", self.host_name, message)
        with contextlib.suppress(ConnectionClosed):
            self.write_message(json.dumps({"type": "error", "message": message}))

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._closing = True  # what the host sent after the message that closed it is ignored
        super().close(code, reason)

    def on_message(self, message: str | bytes) -> None:
        """Queue a control message: they are handled one at a time, in the order sent (a
        hello's offers are stored before the heartbeat after it is read)."""
        if self.host_name is None or self._closing:
            return
        # Any message says the host is alive, now: the queue may wait on the store.
        self.broker.host_alive(self.host_name, self)
        inbox = getattr(self, "_inbox", None)
        if inbox is None:
            inbox = self._inbox = collections.deque()
        inbox.append(message)
        if len(inbox) == 1:
            asyncio.get_running_loop().create_task(self._drain_inbox())

    async def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            try:
                await self._handle_control(inbox[0])
            except Exception as error:
                if not unavailable(error):
                    log.exception("host %s: control message not handled", self.host_name)
                else:  # the store is down: the host repeats what matters (hello, reports)
                    log.warning("host %s: the store did not answer: %s", self.host_name, error)
            finally:
                inbox.popleft()
                if self._closing:
                    inbox.clear()

    async def _handle_control(self, message: str | bytes) -> None:
        name = self.host_name
        if name is None or self._closing:
            return
        settings = self.broker.settings
        hard_cap = max(settings.host_hello_max_bytes, settings.host_heartbeat_max_bytes)
        try:
            data = parse_control(message, hard_cap)
        except HostMessageError as error:
            self._refuse("control", error)
            self.close(CLOSE_BAD_MESSAGE, "control messages are JSON objects with a 'type'")
            return
        kind = message_kind(data)
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        try:
            if kind == "hello":
                if size > settings.host_hello_max_bytes:
                    raise HostMessageError(
                        f"{size} bytes is over the {settings.host_hello_max_bytes} limit"
                    )
                hello = validate_hello(data)
                self._hello_seen = True  # said in time, even if storing its offers is slow
                try:
                    await self.broker.host_connected(name, self, hello)
                except Exception as error:
                    if not unavailable(error):
                        raise
                    # Its offers cannot be stored now: the agent reconnects with backoff.
                    log.warning("host %s: hello not stored (%s); closing", name, error)
                    self.close(1013, "the broker's database is busy; reconnect later")
                    return
                if self._closing:  # it went away while its offers were being stored
                    self.broker.host_disconnected(name, self)
                return
            if size > settings.host_heartbeat_max_bytes:
                raise HostMessageError(
                    f"{size} bytes is over the {settings.host_heartbeat_max_bytes} limit"
                )
            if kind == "heartbeat":
                self.broker.heartbeat(name, validate_heartbeat(data), heartbeat_busy(data))
            elif kind == "kernel_ready":
                await self.broker.kernel_ready(name, validate_session_report(data)["session_id"])
            elif kind in ("kernel_ended", "kernel_failed"):
                report = validate_session_report(data)
                await self.broker.kernel_ended(
                    name, report["session_id"], report["reason"], report["message"]
                )
            else:
                log.debug("host %s sent an unknown control message %r", name, kind)
        except HostMessageError as error:
            self._refuse(kind, error)
            if kind == "hello":
                self.close(CLOSE_BAD_MESSAGE, "refused hello")
            elif kind == "heartbeat":
                self.broker.heartbeat(name, None)  # alive, but its telemetry is not kept
        except (KeyError, ValueError, TypeError) as error:
            self._refuse(kind, f"{type(error).__name__}: {str(error)[:200]}")

    def on_open(self) -> None:
        # A host that authenticates and then says nothing holds a socket for nothing.
        timeout = self.broker.settings.host_hello_timeout
        self._hello_timer = asyncio.get_running_loop().call_later(timeout, self._no_hello)

    def _no_hello(self) -> None:
        if not self._hello_seen and not self._closing:
            limit = self.broker.settings.host_hello_timeout
            log.warning("host %s sent no hello within %g s; closing", self.host_name, limit)
            self.close(CLOSE_NO_HELLO, f"no hello within {limit:g} s")

    def on_close(self) -> None:
        self._closing = True
        timer = getattr(self, "_hello_timer", None)
        if timer is not None:
            timer.cancel()
        if self.host_name is not None:
            self.broker.host_disconnected(self.host_name, self)


class RelayHandler(BrokerWebSocket):
    """One side of a session's kernel relay; messages are copied, never parsed."""

    side: str = USER
    session_id: str = ""

    async def get(self, session_id: str, side: str) -> None:  # type: ignore[override]
        account = self.authenticated_account()
        # A broker that just started serves before it has loaded the unfinished sessions:
        # a relay that reconnects at once must not be told its session is gone.
        await self.broker.ready.wait()
        live = self.broker.sessions.get(session_id)
        if live is None:
            serving = await self.broker.live_elsewhere(session_id, account.name, side)
            if serving is not None and serving[1]:
                # Several brokers: its host is another broker's; the relay is there.
                self.redirect(f"{serving[1].rstrip('/')}{self.request.path}", status=307)
                return
            if serving is not None:
                # On its way to this broker (a failover), or its broker has no public
                # URL: come back in a moment.
                raise HeaderedError(
                    503,
                    f"session {session_id!r} is not served by this broker now",
                    {"Retry-After": 1},
                )
        if live is None:
            raise web.HTTPError(404, f"no running session {session_id!r}")
        owner = live.renter if side == USER else live.host
        if account.name != owner or account.role != ("user" if side == USER else "host"):
            raise web.HTTPError(404, f"no running session {session_id!r}")
        self.side, self.session_id = side, session_id
        await super().get(session_id, side)

    def on_open(self) -> None:
        self.pair = self.broker.relays.pair(self.session_id)
        self.pair.attach(self.side, self)

    def on_messages(self, messages: list[Message]) -> None:
        if not self.pair.forward(self.side, messages):
            self.close(CLOSE_BUFFER_FULL, "the other side is away and the relay buffer is full")

    def on_pause(self, paused: bool) -> None:
        pair = getattr(self, "pair", None)
        if pair is not None:
            pair.backlogged(self.side, paused)

    def on_close(self) -> None:
        pair = getattr(self, "pair", None)
        if pair is not None:
            pair.detach(self.side, self)


class NoRouteHandler(BrokerAPIHandler):
    """A path under the API that names no route: JSON 404 (401 without a token), not
    jupyter_server's HTML page."""

    @web.authenticated
    @authorized
    def _no_route(self, *args: Any) -> None:
        raise web.HTTPError(404, "no such API route (the routes: /gpu-share/api/openapi.json)")

    get = post = put = patch = delete = _no_route


def default_handlers() -> list[tuple[str, type]]:
    """The broker's routes."""
    from .class_handlers import class_handlers
    from .receipt_handlers import receipt_handlers

    sid = r"(?P<session_id>s-[0-9a-f]{1,64})"
    return [
        (rf"{API}/openapi.json", OpenAPIHandler),
        (rf"{API}/health", HealthHandler),
        (rf"{API}/me", MeHandler),
        (rf"{API}/me/caps", CapsHandler),
        (rf"{API}/accounts", AccountsHandler),
        (rf"{API}/accounts/(?P<name>[^/]+)/tokens", TokensHandler),
        (rf"{API}/accounts/(?P<name>[^/]+)/credit", CreditHandler),
        (rf"{API}/offers", OffersHandler),
        (rf"{API}/earnings", EarningsHandler),
        (rf"{API}/sessions", SessionsHandler),
        (rf"{API}/sessions/{sid}", SessionHandler),
        *class_handlers(API),
        (rf"{API}/hosts/connect", HostControlHandler),
        (rf"{API}/relay/{sid}/(?P<side>user|host)", RelayHandler),
        *receipt_handlers(API),
        (rf"{API}/.*", NoRouteHandler),  # last: anything else under the API is a JSON 404
    ]
