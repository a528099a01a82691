"""``GET /gpu-share/api/health``: whether this broker serves now, for a load balancer.

No token: a load balancer has none. It says only whether the broker serves (200) or not
(503: starting, its store does not answer, or its leases lapsed), and the broker's id.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler

from ..clock import now_us

STORE_ANSWER_S = 2.0  # a store slower than this to answer a read: the broker is unhealthy


async def problem(broker: Any) -> str | None:
    """Why the broker does not serve now, or None."""
    if not broker.ready.is_set():
        return "starting: loading the unfinished sessions"
    try:
        await asyncio.wait_for(broker.db.broker_heartbeats(), STORE_ANSWER_S)
    except Exception as error:  # down, locked, timed out: whatever it is, not serving
        return f"the store does not answer: {error or type(error).__name__}"
    if broker.shared_store and now_us() - broker.renewed_us > broker.lease_ttl_us:
        return "its host leases lapsed: the store did not take their renewal in time"
    return None


class HealthHandler(APIHandler):
    """200 {"status": "ok"} while this broker serves, else 503 with the reason."""

    def check_xsrf_cookie(self) -> None:
        """Only GET: nothing to forge."""

    @allow_unauthenticated
    async def get(self) -> None:
        broker = self.settings["gpu_share_broker"]
        reason = await problem(broker)
        self.set_header("Cache-Control", "no-store")
        self.set_status(200 if reason is None else 503)
        body = {"status": "ok" if reason is None else "unavailable", "broker_id": broker.broker_id}
        if reason is not None:
            body["reason"] = reason
        self.finish(body)

    head = get
