"""The user side's log of what a remote kernel's cells printed (kernel/outputs.py)."""

from __future__ import annotations

from jupyter_client.session import Session

from jupyter_gpu_share.kernel.outputs import OutputLog

SESSION = Session(key=b"k")


def request(cell_id: str | None, code: str = "print(1)") -> tuple[str, list[bytes]]:
    metadata = {"cellId": cell_id} if cell_id else {}
    msg = SESSION.msg("execute_request", {"code": code}, metadata=metadata)
    return msg["header"]["msg_id"], SESSION.serialize(msg, ident=[b"lab"])


def published(parent: str, kind: str, content: dict) -> list[bytes]:
    msg = SESSION.msg(kind, content, parent={"msg_id": parent, "msg_type": "execute_request"})
    return SESSION.serialize(msg, ident=[f"kernel.x.{kind}".encode()])


def test_a_cells_outputs_are_kept_until_idle_and_nbclient_requests_keep_nothing():
    log = OutputLog()
    msg_id, frames = request("cell-1")
    log.requested(frames)
    log.published(published(msg_id, "status", {"execution_state": "busy"}))
    log.published(published(msg_id, "execute_input", {"code": "x", "execution_count": 7}))
    log.published(published(msg_id, "stream", {"name": "stdout", "text": "line 0\n"}))
    log.published(published(msg_id, "display_data", {"data": {"text/plain": "d"}}))
    [execution] = log.snapshot()
    assert execution["cell_id"] == "cell-1" and not execution["done"]
    assert execution["execution_count"] == 7
    assert [o["msg_type"] for o in execution["outputs"]] == ["stream", "display_data"]
    log.published(published(msg_id, "status", {"execution_state": "idle"}))
    assert log.snapshot()[0]["done"]

    other, frames = request(None)  # no cell: not a lab's
    log.requested(frames)
    log.published(published(other, "stream", {"name": "stdout", "text": "x"}))
    assert len(log.snapshot()) == 1
    log.published(published("unknown", "stream", {"name": "stdout", "text": "x"}))
    assert len(log.snapshot()[0]["outputs"]) == 2


def test_the_latest_run_of_a_cell_is_what_it_shows():
    log = OutputLog()
    first, frames = request("c")
    log.requested(frames)
    log.published(published(first, "stream", {"name": "stdout", "text": "old\n"}))
    second, frames = request("c")
    log.requested(frames)
    log.published(published(second, "stream", {"name": "stdout", "text": "new\n"}))
    [execution] = log.snapshot()
    assert execution["msg_id"] == second
    assert execution["outputs"][0]["content"]["text"] == "new\n"


def test_the_log_is_bounded_oldest_first_then_the_start_of_a_long_run():
    log = OutputLog(max_bytes=2000)
    old, frames = request("a")
    log.requested(frames)
    log.published(published(old, "stream", {"name": "stdout", "text": "x" * 900}))
    running, frames = request("b")
    log.requested(frames)
    for i in range(10):
        log.published(published(running, "stream", {"name": "stdout", "text": f"{i}" * 300}))
    assert log.size <= 2000
    [execution] = log.snapshot()  # the old run went first
    assert execution["cell_id"] == "b" and execution["dropped"] > 0
    assert execution["outputs"][-1]["content"]["text"] == "9" * 300


def test_hostile_frames_are_ignored():
    log = OutputLog()
    log.requested([b"<IDS|MSG>", b"sig", b"not json", b"{}", b"{}", b"{}"])
    log.requested([b"nothing"])
    msg_id, frames = request("c" * 500)  # a cell id too long to keep
    log.requested(frames)
    assert log.snapshot() == []
    msg_id, frames = request("c")
    log.requested(frames)
    log.published([b"<IDS|MSG>", b"", b"{", b'{"msg_id": 3}', b"{}", b"{}"])
    log.published(published(msg_id, "stream", {"name": "stdout", "text": "ok"}))
    assert log.snapshot()[0]["outputs"][0]["content"]["text"] == "ok"


def test_hostile_nesting_and_empty_messages_neither_raise_nor_escape_the_bound():
    log = OutputLog(max_bytes=64 * 1024)
    msg_id, frames = request("c")
    log.requested(frames)
    nested = published(msg_id, "display_data", {"data": {}})
    at = nested.index(b"<IDS|MSG>")
    nested[at + 5] = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError
    log.published(nested)  # kept as bytes, and must not raise
    log.snapshot()  # nor here
    empty = published(msg_id, "stream", {})
    empty[empty.index(b"<IDS|MSG>") + 5] = b""
    for _ in range(10_000):
        log.published(empty)
    assert log.size <= 64 * 1024


def test_update_display_data_is_not_kept():
    log = OutputLog()
    msg_id, frames = request("c")
    log.requested(frames)
    for _ in range(100):
        log.published(published(msg_id, "update_display_data", {"data": {}, "transient": {}}))
    assert log.snapshot()[0]["outputs"] == []
