"""The OpenAPI document describes every REST route the broker serves."""

from __future__ import annotations

import re

from jupyter_gpu_share.broker.handlers import default_handlers
from jupyter_gpu_share.broker.openapi import openapi_document

NOT_REST = ("/openapi.json", "/hosts/connect", "/relay/")


def test_every_rest_route_is_documented():
    documented = [
        re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for path in openapi_document()["paths"]
    ]
    for pattern, _ in default_handlers():
        if any(part in pattern for part in NOT_REST):
            continue
        example = re.sub(r"\(\?P<\w+>[^)]*\)", "x.ipynb", pattern)
        assert any(d.match(example) for d in documented), f"{pattern} is not documented"
