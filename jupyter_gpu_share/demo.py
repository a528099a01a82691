"""``jupyter gpu-share demo``: a broker, a local host and JupyterLab, wired together."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .client import BrokerClient, BrokerError
from .ledger import format_credits, parse_positive_credits

DEMO_NOTEBOOK = {
    "cells": [
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": [
                "# A kernel on a shared host\n",
                "This notebook's kernel runs on a host agent found by the broker; every second of "
                "its life is billed to the `demo` account. Without a GPU the host offers a CPU "
                "kernel, labelled `CPU`.",
            ],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": [
                "import os, socket\n",
                "print('host:', os.environ['GPU_SHARE_HOST_ID'])\n",
                "print('session:', os.environ['GPU_SHARE_SESSION_ID'])\n",
                "gpus = os.environ.get('CUDA_VISIBLE_DEVICES')\n",
                "print('GPUs visible:', gpus or 'none (CPU kernel)')",
            ],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": ["sum(i * i for i in range(10_000_000))"],
        },
    ],
    "metadata": {
        "kernelspec": {
            "name": "gpu-share",
            "display_name": "Python 3 (shared GPU)",
            "language": "python",
        },
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    """Print one line of progress."""
    print(f"[gpu-share demo] {message}", flush=True)


def wait_until(check, what: str, timeout: float, processes: list[subprocess.Popen]) -> None:  # type: ignore[type-arg]
    """Poll ``check`` until it is true, failing early if one of ``processes`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{what}: {process.args[2:4]} exited with code {process.returncode}"
                )
        try:
            if check():
                return
        except (BrokerError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def lab_answers(port: int, token: str) -> bool:
    """Whether JupyterLab's server answers its status API."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status == 200


def stop_all(processes: list[subprocess.Popen]) -> None:  # type: ignore[type-arg]
    """SIGTERM every process, then SIGKILL what is left after 10 s.

    A second Ctrl-C (or a terminal's SIGINT to the whole group) must not cut the clean-up
    short and leave a traceback, so signals are ignored while it runs.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            process.wait(remaining)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(argv: list[str]) -> int:
    """Start the demo and block until Ctrl-C.

    The servers run in sessions of their own: a terminal's Ctrl-C (SIGINT to the whole
    foreground group) reaches only the demo, which stops them in order (SIGTERM); else
    each would take the interrupt itself, and the broker printed a traceback. A closed
    terminal (SIGHUP) stops them too.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt_on_sigterm)
    parser = argparse.ArgumentParser(prog="jupyter gpu-share demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8888, help="JupyterLab's port (default 8888)")
    parser.add_argument(
        "--broker-port", type=int, default=0, help="the broker's port (default: a free one)"
    )
    parser.add_argument(
        "--price-per-hour", default="0.60", help="the local host's price in credits per hour"
    )
    parser.add_argument("--credits", default="100", help="credits given to the demo renter")
    parser.add_argument("--no-lab", action="store_true", help="start only the broker and the host")
    parser.add_argument(
        "--dir", help="working folder (default: a new temporary folder, removed at exit)"
    )
    args = parser.parse_args(argv)
    try:
        credits = parse_positive_credits(args.credits)
        parse_positive_credits(args.price_per_hour)
    except ValueError as error:
        print(f"jupyter gpu-share demo: error: {error}", file=sys.stderr)
        return 2

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="gpu-share-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    notebooks = workdir / "notebooks"
    notebooks.mkdir(exist_ok=True)
    broker_port = args.broker_port or free_port()
    broker_url = f"http://127.0.0.1:{broker_port}"
    admin_token = secrets.token_urlsafe(32)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SHARE_")}
    processes: list[subprocess.Popen] = []  # type: ignore[type-arg]
    cli = [sys.executable, "-m", "jupyter_gpu_share.cli"]
    as_root = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []
    try:
        say(f"starting the broker on {broker_url} (SQLite in {workdir})")
        processes.append(
            subprocess.Popen(
                [
                    *cli,
                    "broker",
                    f"--port={broker_port}",
                    "--ServerApp.ip=127.0.0.1",
                    "--ServerApp.port_retries=0",
                    f"--db=sqlite:///{workdir / 'broker.sqlite'}",
                    f"--ServerApp.root_dir={workdir}",
                    *as_root,
                ],
                env={**base_env, "GPU_SHARE_ADMIN_TOKEN": admin_token},
                start_new_session=True,  # Ctrl-C is the demo's to pass on
            )
        )
        admin = BrokerClient(broker_url, admin_token, timeout=5)
        wait_until(lambda: admin.request("GET", "/me"), "broker", 60, processes)

        admin.request("POST", "/accounts", {"name": "demo", "role": "user"})
        user_token = admin.request("POST", "/accounts/demo/tokens")["token"]
        admin.request("POST", "/accounts/demo/credit", {"amount_micro": credits})
        admin.request("POST", "/accounts", {"name": "demo-host", "role": "host"})
        host_token = admin.request("POST", "/accounts/demo-host/tokens")["token"]
        say(f"renter 'demo' has {format_credits(credits)} credits")

        say(f"starting a host agent on this machine at {args.price_per_hour} credits/hour")
        sandbox_flags: list[str] = []
        if shutil.which("bwrap") is None:
            # The renter here is you, on your own machine; a real host installs bubblewrap.
            say("bubblewrap is not installed: the demo host runs kernels without a sandbox")
            sandbox_flags = ["--no-sandbox"]
        processes.append(
            subprocess.Popen(
                [
                    *cli,
                    "host",
                    "--broker",
                    broker_url,
                    "--price-per-hour",
                    args.price_per_hour,
                    *sandbox_flags,
                ],
                env={**base_env, "GPU_SHARE_TOKEN": host_token},
                start_new_session=True,  # Ctrl-C is the demo's to pass on
            )
        )
        wait_until(lambda: admin.request("GET", "/offers"), "host agent", 60, processes)
        offer = admin.request("GET", "/offers")[0]
        kind = (
            offer["gpu_model"]
            if offer["gpu_count"] == 0
            else f"{offer['gpu_count']} x {offer['gpu_model']}"
        )
        say(f"offer online: {kind} on {offer['host_id']}")

        user_env = {**base_env, "GPU_SHARE_BROKER_URL": broker_url, "GPU_SHARE_TOKEN": user_token}
        if args.no_lab:
            say(f"export GPU_SHARE_BROKER_URL={broker_url} GPU_SHARE_TOKEN={user_token}")
        else:
            (notebooks / "gpu-share-demo.ipynb").write_text(json.dumps(DEMO_NOTEBOOK, indent=1))
            lab_token = secrets.token_hex(16)
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "jupyterlab",
                        f"--port={args.port}",
                        "--ServerApp.ip=127.0.0.1",
                        "--no-browser",
                        f"--IdentityProvider.token={lab_token}",
                        f"--ServerApp.root_dir={notebooks}",
                        *as_root,
                    ],
                    env=user_env,
                    start_new_session=True,  # Ctrl-C is the demo's to pass on
                )
            )
            say("starting JupyterLab")
            wait_until(lambda: lab_answers(args.port, lab_token), "JupyterLab", 120, processes)
            lab_url = (
                f"http://127.0.0.1:{args.port}/lab/tree/gpu-share-demo.ipynb?token={lab_token}"
            )
            say(f"JupyterLab: {lab_url}")
            say(
                "pick the 'Python 3 (shared GPU)' kernel; "
                "`jupyter gpu-share sessions` in a JupyterLab terminal shows the bill"
            )
            say(f"elsewhere: export GPU_SHARE_BROKER_URL={broker_url} GPU_SHARE_TOKEN={user_token}")
        say("press Ctrl-C to stop everything")
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        failed = [p for p in processes if p.poll() is not None]
        say(f"{failed[0].args[2:4]} exited with code {failed[0].returncode}; stopping the demo")
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except (RuntimeError, BrokerError) as error:
        print(f"jupyter gpu-share demo: error: {error}", file=sys.stderr)
        return 1
    finally:
        stop_all(processes)
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
