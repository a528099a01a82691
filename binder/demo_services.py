"""Start a broker and a host agent in the background for the Binder demo; write env.sh."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from jupyter_gpu_share.client import BrokerClient, BrokerError
from jupyter_gpu_share.demo import DEMO_NOTEBOOK, free_port

HOME = Path(os.environ.get("HOME", "."))
STATE = HOME / ".gpu-share-demo"
CLI = [sys.executable, "-m", "jupyter_gpu_share.cli"]
ROOT_FLAG = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []  # Binder runs as jovyan


def spawn(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a process that outlives this script, logging to STATE/<name>.log."""
    log = (STATE / f"{name}.log").open("ab")
    return subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for(check, what: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check`` until true; fail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gpu-share demo: the {what} exited; see {STATE}/*.log")
        try:
            if check():
                return
        except (BrokerError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"gpu-share demo: the {what} did not start in {timeout:.0f} s")


def main() -> None:
    """Start everything once; a second run (a restarted server) reuses what runs."""
    STATE.mkdir(exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SHARE_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_urlsafe(32)
    broker = spawn(
        "broker",
        [
            *CLI,
            "broker",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            f"--db=sqlite:///{STATE / 'broker.sqlite'}",
            f"--ServerApp.root_dir={STATE}",
            *ROOT_FLAG,
        ],
        {**base_env, "GPU_SHARE_ADMIN_TOKEN": admin_token},
    )
    admin = BrokerClient(url, admin_token, timeout=5)
    wait_for(lambda: admin.request("GET", "/me"), "broker", broker)
    admin.request("POST", "/accounts", {"name": "demo", "role": "user"})
    admin.request("POST", "/accounts/demo/credit", {"amount_micro": 100_000_000})
    user_token = admin.request("POST", "/accounts/demo/tokens")["token"]
    admin.request("POST", "/accounts", {"name": "binder-host", "role": "host"})
    host_token = admin.request("POST", "/accounts/binder-host/tokens")["token"]
    # Binder containers cannot make the user namespaces bubblewrap needs; the renter and the
    # host are the same person here, so the kernels run unsandboxed.
    host = spawn(
        "host",
        [
            *CLI,
            "host",
            "--broker",
            url,
            "--price-per-hour",
            "0.60",
            "--HostAgent.sandbox=none",
            f"--scratch-root={STATE / 'scratch'}",
        ],
        {**base_env, "GPU_SHARE_TOKEN": host_token},
    )
    wait_for(lambda: admin.request("GET", "/offers"), "host agent", host)
    notebook = HOME / "gpu-share-demo.ipynb"
    if not notebook.exists():
        notebook.write_text(json.dumps(DEMO_NOTEBOOK, indent=1))
    (STATE / "pids").write_text(f"{broker.pid} {host.pid}\n")
    (STATE / "env.sh").write_text(
        f"export GPU_SHARE_BROKER_URL={url}\nexport GPU_SHARE_TOKEN={user_token}\n"
    )
    os.chmod(STATE / "env.sh", 0o600)
    print(f"gpu-share demo: broker {url}, host 'binder-host' online, renter 'demo' has 100 credits")


if __name__ == "__main__":
    main()
