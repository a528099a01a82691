"""The OpenAPI document describes every REST route the broker serves."""

from __future__ import annotations

import functools
import re

from jupyter_gpu_share.broker.handlers import default_handlers
from jupyter_gpu_share.broker.openapi import openapi_document

NOT_REST = ("/openapi.json", "/hosts/connect", "/relay/")


def test_every_rest_route_is_documented():
    documented = [
        re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for path in openapi_document()["paths"]
    ]
    for pattern, handler in default_handlers():
        if any(part in pattern for part in NOT_REST) or handler.__name__ == "NoRouteHandler":
            continue  # websockets, and the JSON 404 for every path that is no route
        example = re.sub(r"\(\?P<\w+>[^)]*\)", "x.ipynb", pattern)
        assert any(d.match(example) for d in documented), f"{pattern} is not documented"


def test_every_offer_field_is_documented_with_the_sandbox():
    from types import SimpleNamespace

    from jupyter_gpu_share.broker.handlers import offer_model
    from jupyter_gpu_share.broker.matching import OfferView
    from jupyter_gpu_share.broker.service import Broker, HostLink

    sandbox = {"kind": "bwrap", "network": "public", "limits": {"memory_mib": 1024}}
    link = HostLink("h", 1, [], None, 0, sandboxes={7: sandbox})
    broker = SimpleNamespace(hosts={"h": link}, _hosts_elsewhere=(0, []))
    broker.offer_details = functools.partial(Broker.offer_details, broker)
    model = offer_model(broker, OfferView(7, "h", "CPU", 0, 0, 1), {})  # type: ignore[arg-type]
    assert model["sandbox"] == sandbox
    schemas = openapi_document()["components"]["schemas"]
    assert set(model) <= set(schemas["Offer"]["properties"])
    documented = schemas["Sandbox"]["properties"]
    assert documented["network"]["enum"] == ["none", "public", "allowlist", "host"]
    assert set(documented["limits"]["properties"]) == {
        "memory_mib",
        "max_processes",
        "cpu",
        "scratch_mib",
        "bandwidth_kbit",
        "connections_per_minute",
    }
