"""Choosing the broker's event loop: uvloop where installed, the standard loop on request."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from jupyter_gpu_share.loops import EventLoopError, choice_in_argv, install_event_loop, loop_in_use


@pytest.fixture(autouse=True)
def _restore_policy():
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


def test_asyncio_keeps_the_standard_loop():
    assert install_event_loop("asyncio") == "asyncio"
    assert loop_in_use() == "asyncio"


def test_auto_takes_uvloop_where_installed():
    pytest.importorskip("uvloop")
    assert install_event_loop("auto") == "uvloop"
    assert loop_in_use() == "uvloop"

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert asyncio.run(which()).startswith("uvloop")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert install_event_loop("auto") == "asyncio"
    assert loop_in_use() == "asyncio"
    with pytest.raises(EventLoopError, match="pip install uvloop"):
        install_event_loop("uvloop")


def test_an_unknown_loop_is_refused_naming_the_choices():
    with pytest.raises(EventLoopError, match="'trio' is not one of auto, uvloop, asyncio"):
        install_event_loop("trio")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["--port=1"], None),
        (["--event-loop=asyncio"], "asyncio"),
        (["--event-loop", "uvloop", "--port=1"], "uvloop"),
        (["--BrokerApp.event_loop='asyncio'"], "asyncio"),
        (["--event-loop=uvloop", "--BrokerApp.event_loop=asyncio"], "asyncio"),  # the last wins
        (["--event-loop"], None),  # no value: traitlets says so
    ],
)
def test_the_choice_is_read_off_the_command_line_as_traitlets_would(argv, expected):
    assert choice_in_argv(argv, ("event-loop", "BrokerApp.event_loop")) == expected


def test_the_broker_refuses_an_unknown_loop_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_share.cli", "broker", "--event-loop=trio"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"GPU_SHARE_DB_URL": f"sqlite:///{tmp_path}/b.sqlite", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "jupyter gpu-share: error: event loop 'trio' is not one of auto, uvloop, asyncio"
    )
