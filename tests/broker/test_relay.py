"""The relay pair: copying batches between the two sides, waiting for an absent side, and
passing back-pressure from one side's full buffer to the other side's reads."""

from __future__ import annotations

from jupyter_gpu_share.broker.relay import (
    CLOSE_REPLACED,
    CLOSE_STOPPED,
    HOST,
    USER,
    RelayPair,
)


class End:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.writes = 0
        self.paused: list[bool] = []
        self.closed: tuple[int | None, str | None] | None = None

    def send_many(self, messages: list[tuple[int, bytes]]) -> None:
        self.writes += 1
        self.sent.extend(messages)

    def pause_reading(self, paused: bool) -> None:
        self.paused.append(paused)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = (code, reason)


def test_a_batch_is_copied_with_one_write_and_counted():
    pair = RelayPair("s-1", max_buffer_bytes=100)
    user, host = End(), End()
    pair.attach(USER, user)
    pair.attach(HOST, host)
    batch = [(2, b"a"), (2, b"bc"), (1, b"{}")]
    assert pair.forward(USER, batch)
    assert host.sent == batch and host.writes == 1 and user.sent == []
    assert pair.messages == 3


def test_messages_wait_for_an_absent_side_up_to_the_buffer_limit():
    pair = RelayPair("s-1", max_buffer_bytes=10)
    user = End()
    pair.attach(USER, user)
    assert pair.forward(USER, [(2, b"12345"), (2, b"678")])
    assert not pair.forward(USER, [(2, b"too much")])  # 8 + 8 > 10: refused, nothing kept
    host = End()
    pair.attach(HOST, host)
    assert host.sent == [(2, b"12345"), (2, b"678")] and host.writes == 1
    assert pair.forward(USER, [(2, b"0123456789")])  # the buffer was emptied by the flush


def test_a_full_side_pauses_the_other_sides_reads_until_it_drains_or_leaves():
    pair = RelayPair("s-1", max_buffer_bytes=10)
    user, host = End(), End()
    pair.attach(USER, user)
    pair.attach(HOST, host)
    pair.backlogged(USER, True)  # the renter reads slowly: hold the host
    assert host.paused == [True] and user.paused == []
    pair.backlogged(USER, False)
    assert host.paused == [True, False]
    pair.backlogged(USER, True)
    pair.detach(USER, user)  # the slow renter went away: the host reads again
    assert host.paused == [True, False, True, False]


def test_a_side_that_reconnects_while_the_other_is_backlogged_starts_held():
    pair = RelayPair("s-1", max_buffer_bytes=10)
    user, host = End(), End()
    pair.attach(USER, user)
    pair.attach(HOST, host)
    pair.backlogged(USER, True)
    again = End()  # the host agent reconnects (a network blip) while the renter lags
    pair.attach(HOST, again)
    assert again.paused == [True]
    pair.backlogged(USER, False)
    assert again.paused == [True, False]


def test_a_new_connection_replaces_the_old_one_and_close_reaches_both():
    pair = RelayPair("s-1", max_buffer_bytes=10)
    old, new, host = End(), End(), End()
    pair.attach(USER, old)
    pair.attach(USER, new)
    assert old.closed == (CLOSE_REPLACED, "replaced by a new connection")
    pair.attach(HOST, host)
    pair.close(CLOSE_STOPPED, "stopped")
    assert new.closed == host.closed == (CLOSE_STOPPED, "stopped")
    assert pair.ends == {USER: None, HOST: None}
