"""The host token from a file only its owner can read, or from the environment."""

from __future__ import annotations

import os
import threading

import pytest

from jupyter_gpu_share.host.agent import AgentConfigError, HostAgent
from jupyter_gpu_share.host.tokens import (
    MAX_TOKEN_FILE_BYTES,
    TokenFileError,
    argv_warning,
    read_token_file,
)


def secret(tmp_path, content: bytes | str, mode: int = 0o600, name: str = "token"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def test_a_private_file_gives_its_token_without_whitespace(tmp_path):
    assert read_token_file(str(secret(tmp_path, "  gst_abc123\n\n"))) == "gst_abc123"
    assert read_token_file(str(secret(tmp_path, "gst_x", mode=0o400))) == "gst_x"


@pytest.mark.parametrize("mode", [0o604, 0o640, 0o620, 0o602, 0o666, 0o700 | 0o010])
def test_a_file_group_or_others_may_use_is_refused_with_the_fix(tmp_path, mode):
    path = secret(tmp_path, "gst_abc", mode=mode)
    with pytest.raises(TokenFileError) as refused:
        read_token_file(str(path), "host token")
    message = str(refused.value)
    assert f"chmod 600 {path}" in message and f"{mode:04o}" in message
    assert "gst_abc" not in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        (b"\xff\xfe", "not UTF-8"),
        ("a" * (MAX_TOKEN_FILE_BYTES + 1), f"over {MAX_TOKEN_FILE_BYTES} bytes"),
        ("gst_a gst_b", "more than one word"),
    ],
)
def test_an_odd_file_is_refused(tmp_path, content, fragment):
    with pytest.raises(TokenFileError, match=fragment):
        read_token_file(str(secret(tmp_path, content)))


def test_what_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    with pytest.raises(TokenFileError, match="No such file"):
        read_token_file(str(tmp_path / "missing"))
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_token_file(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    done = threading.Event()

    def read() -> None:
        with pytest.raises(TokenFileError, match="not a regular file"):
            read_token_file(str(fifo))
        done.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert done.wait(5), "reading a FIFO blocked the agent"


def test_the_agent_takes_its_tokens_from_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_SHARE_TOKEN", "from-env")
    host = secret(tmp_path, "from-file\n", name="host")
    gateway = secret(tmp_path, "gw-file\n", name="gateway")
    agent = HostAgent(
        broker_url="http://127.0.0.1:9",
        token_file=str(host),
        gateway_token_file=str(gateway),
        gateway_url="http://127.0.0.1:8",
    )
    agent.check_config()
    assert (agent.token, agent.gateway_token) == ("from-file", "gw-file")

    assert HostAgent(broker_url="http://127.0.0.1:9").token == "from-env"  # the environment
    host.chmod(0o644)
    with pytest.raises(AgentConfigError, match="chmod 600"):
        HostAgent(broker_url="http://127.0.0.1:9", token_file=str(host)).check_config()


def test_no_token_says_where_to_put_one(monkeypatch):
    monkeypatch.delenv("GPU_SHARE_TOKEN", raising=False)
    with pytest.raises(AgentConfigError) as refused:
        HostAgent(broker_url="http://127.0.0.1:9").check_config()
    assert "--token-file PATH" in str(refused.value) and "GPU_SHARE_TOKEN" in str(refused.value)


def test_the_argv_warning_names_ps_and_the_safe_ways():
    text = argv_warning("--token", "--token-file", "GPU_SHARE_TOKEN")
    assert "`ps` shows it to every local user" in text
    assert "--token-file PATH" in text and "GPU_SHARE_TOKEN" in text and "\n" not in text
