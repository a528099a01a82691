"""``GET /gpu-share/api/health``: whether this broker serves now, for a load balancer.

No token: a load balancer has none. It says only whether the broker serves (200) or not
(503: starting, its store does not answer, or its leases lapsed), and the broker's id;
the store's own error goes to the broker's log, not to the caller. The store is asked at
most once a second, however many probes come (one read in flight, its answer shared).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler

STORE_ANSWER_S = 2.0  # a store slower than this to answer a read: the broker is unhealthy
PROBE_EVERY_S = 1.0
log = logging.getLogger("jupyter_gpu_share")


class Health:
    """The last probe's answer, shared by the probes of the next second."""

    def __init__(self) -> None:
        self._at = -PROBE_EVERY_S
        self._store_problem: str | None = None
        self._probe: asyncio.Future[str | None] | None = None

    async def problem(self, broker: Any) -> str | None:
        """Why the broker does not serve now, or None."""
        if not broker.ready.is_set():
            return "starting: loading the unfinished sessions"
        if time.monotonic() - self._at >= PROBE_EVERY_S:
            if self._probe is None:
                self._probe = asyncio.ensure_future(self._ask_store(broker))
            probe = self._probe
            try:
                self._store_problem = await asyncio.shield(probe)
            finally:
                if self._probe is probe and probe.done():
                    self._probe = None
                    self._at = time.monotonic()
        if self._store_problem is not None:
            return self._store_problem
        if broker.shared_store and broker.lease_now() - broker.renewed_us > broker.lease_ttl_us:
            return "its host leases lapsed: the store did not take their renewal in time"
        return None

    @staticmethod
    async def _ask_store(broker: Any) -> str | None:
        try:
            await asyncio.wait_for(broker.db.broker_heartbeats(), STORE_ANSWER_S)
        except Exception as error:  # down, locked, timed out: whatever it is, not serving
            log.warning("health: the store did not answer: %s", error or type(error).__name__)
            return "the store does not answer"
        return None


class HealthHandler(APIHandler):
    """200 {"status": "ok"} while this broker serves, else 503 with the reason."""

    def check_xsrf_cookie(self) -> None:
        """Only GET: nothing to forge."""

    @allow_unauthenticated
    async def get(self) -> None:
        broker = self.settings["gpu_share_broker"]
        health = self.settings.setdefault("gpu_share_health", Health())
        reason = await health.problem(broker)
        self.set_header("Cache-Control", "no-store")
        self.set_status(200 if reason is None else 503)
        body = {"status": "ok" if reason is None else "unavailable", "broker_id": broker.broker_id}
        if reason is not None:
            body["reason"] = reason
        self.finish(body)

    head = get
