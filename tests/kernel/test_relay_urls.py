"""Where the bridge opens a session's relay when several brokers serve one store: the
serving broker first, never in plain text when the user reaches the service over TLS, and
one redirect followed only to a ws(s) URL that keeps TLS."""

from __future__ import annotations

import pytest

from jupyter_gpu_share.kernel.bridge import relay_redirect
from jupyter_gpu_share.kernel.provisioner import relay_urls
from jupyter_gpu_share.transport.websocket import HandshakeError

PATH = "/gpu-share/api/relay/s-1/user"


def test_the_serving_broker_comes_first_then_the_list():
    session = {"relay_path": PATH, "broker_url": "https://b1.example:8441"}
    assert relay_urls(session, ["https://gpu.example", "https://b1.example:8441"]) == [
        f"wss://b1.example:8441{PATH}",
        f"wss://gpu.example{PATH}",
    ]


def test_a_plain_text_serving_broker_is_not_used_when_the_list_is_tls():
    """The token would cross the network in clear (the reviewer's finding)."""
    session = {"relay_path": PATH, "broker_url": "http://10.0.0.11:8765"}
    assert relay_urls(session, ["https://gpu.example"]) == [f"wss://gpu.example{PATH}"]
    # A plain-text service anyway (loopback, a test): the serving broker is used.
    assert relay_urls(session, ["http://127.0.0.1:1"])[0] == f"ws://10.0.0.11:8765{PATH}"


@pytest.mark.parametrize("bad", ["", None, 7, "ftp://x", "not a url"])
def test_a_serving_url_that_is_no_broker_url_is_left_out(bad):
    session = {"relay_path": PATH, "broker_url": bad}
    assert relay_urls(session, ["https://gpu.example"]) == [f"wss://gpu.example{PATH}"]


def test_an_upper_case_scheme_is_still_tls():
    assert relay_urls({"relay_path": PATH}, ["HTTPS://gpu.example"]) == [f"wss://gpu.example{PATH}"]


def _redirect(location: str | None, code: int = 307) -> HandshakeError:
    return HandshakeError(code, "moved", b"", location)


@pytest.mark.parametrize(
    ("url", "location", "followed"),
    [
        (
            f"wss://gpu.example{PATH}",
            f"https://b1.example:8441{PATH}",
            f"wss://b1.example:8441{PATH}",
        ),
        (f"ws://127.0.0.1:1{PATH}", f"http://127.0.0.1:2{PATH}", f"ws://127.0.0.1:2{PATH}"),
        (f"ws://127.0.0.1:1{PATH}", f"https://b1.example{PATH}", f"wss://b1.example{PATH}"),
        (f"wss://gpu.example{PATH}", "/other/path", "wss://gpu.example/other/path"),
        (f"wss://gpu.example{PATH}", f"http://b1.example{PATH}", None),  # TLS to plain text
        (f"wss://gpu.example{PATH}", f"HTTP://b1.example{PATH}", None),
        (f"WSS://gpu.example{PATH}", f"http://b1.example{PATH}", None),
        (f"wss://gpu.example{PATH}", "javascript:alert(1)", None),
        (f"wss://gpu.example{PATH}", "file:///etc/passwd", None),
        (f"wss://gpu.example{PATH}", "https://", None),  # no host
    ],
)
def test_one_redirect_is_followed_only_where_tls_is_kept(url, location, followed):
    assert relay_redirect(url, _redirect(location)) == followed


def test_a_refusal_is_no_redirect():
    assert relay_redirect(f"wss://gpu.example{PATH}", _redirect(None, 503)) is None
    assert relay_redirect(f"wss://gpu.example{PATH}", _redirect("https://x", 404)) is None
