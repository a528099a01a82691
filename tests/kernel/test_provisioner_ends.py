"""Which ends of a remote kernel the user's server logs as errors."""

from __future__ import annotations

import pytest

from jupyter_gpu_share.kernel.provisioner import unexpected_end


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        (None, False),  # still running, or ended without a word
        ("stopped", False),
        ("detached", False),
        ("kernel exited", False),  # code 0, as after a shutdown_request: the broker's close
        ("exited", False),  # the same, when the host's record arrives before the close
        ("kernel exited: died", True),  # a crash
        ("died", True),
        ("host lost", True),
        ("credit exhausted: the renter's credit ran out", True),
        ("the broker was unreachable for 60 s", True),
    ],
)
def test_only_ends_the_user_did_not_ask_for_are_errors(reason, error):
    assert unexpected_end(reason) is error
