"""The broker: a jupyter_server extension for hosts, offers, sessions, the relay and the ledger."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import BrokerApp

    return [{"module": "jupyter_gpu_share.broker.app", "app": BrokerApp}]
