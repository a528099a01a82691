"""The user's own Jupyter servers on this machine, for ``jupyter gpu-share sync``: the
files of a remote kernel come back into the notebook's folder, which only the server that
started the kernel knows."""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

import httpx
from jupyter_server.serverapp import list_running_servers


class NoServer(RuntimeError):
    """No server here holds that session, or one refused."""


def bring_back(session_id: str, server: str | None = None, timeout: float = 900) -> dict[str, Any]:
    """Ask each running Jupyter server of this user (or ``server``, a URL with its
    ``?token=``) to bring back the files of the kernel that runs session ``session_id``."""
    if server:
        base, _, query = server.partition("?")
        token = query.removeprefix("token=") if query.startswith("token=") else ""
        servers = [{"url": base if base.endswith("/") else base + "/", "token": token}]
    else:
        servers = list(list_running_servers())
    if not servers:
        raise NoServer(
            "no Jupyter server of yours runs on this machine "
            "(start JupyterLab, or pass --server URL?token=...)"
        )
    refusals = []
    for info in servers:
        url = urljoin(info["url"], "gpu-share/user/files")
        headers = {"Authorization": f"token {info.get('token', '')}"}
        try:
            answer = httpx.post(
                url, json={"session_id": session_id}, headers=headers, timeout=timeout
            )
        except httpx.HTTPError as error:
            refusals.append(f"{info['url']}: {error}")
            continue
        if answer.status_code == 200:
            return answer.json()
        if answer.status_code == 404:
            continue
        try:
            reason = answer.json().get("message") or answer.reason_phrase
        except ValueError:
            reason = answer.reason_phrase
        raise NoServer(f"{info['url']} answered {answer.status_code}: {reason}")
    extra = f" ({'; '.join(refusals[:3])})" if refusals else ""
    raise NoServer(
        f"no Jupyter server here runs session {session_id}: the files come back through "
        f"the server that started its kernel{extra}"
    )
