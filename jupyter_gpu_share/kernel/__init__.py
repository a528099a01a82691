"""The user side: kernel provisioner, bridge, kernelspec, and a jupyter_server extension."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "jupyter_gpu_share.kernel.extension"}]
