"""How a stop's reason reads in the cell it stopped (kernel/stop_notice.py)."""

from __future__ import annotations

import pytest

from jupyter_gpu_share.kernel.stop_notice import explain


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("credit exhausted", "your credit ran out"),
        ("session cap reached", "spending cap per session"),
        ("daily cap reached", "spending cap per day"),
        ("idle", "idle past your idle limit"),
        ("died", "died on the host"),
        ("host_limit: stopped by the host: out of memory (limit 1024 MiB)", "out of memory"),
        ("host_limit: stopped by the host: out of memory (limit 1024 MiB)", "at one of its limits"),
    ],
)
def test_every_reason_reads_as_words(reason, says):
    assert says in explain(reason)


def test_an_unknown_reason_is_shown_as_it_is():
    assert explain("something new") == "something new"
