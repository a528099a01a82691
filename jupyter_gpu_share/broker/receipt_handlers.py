"""REST handlers for settlement receipts (one session's, the public key, the chain) and audit."""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..store import NotFound, StoreError
from ..store.receipts import MAX_PAGE
from .handlers import BrokerAPIHandler


class SessionReceiptHandler(BrokerAPIHandler):
    """The signed receipt of a settled session: its renter, payer, host or an admin."""

    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        try:
            record = await self.broker.session_record(session_id)
        except NotFound:
            record = None
        name = self.account.name
        allowed = record is not None and (
            self.account.role == "admin" or name in (record.renter, record.payer, record.host)
        )
        if not allowed:
            # The same answer whether it does not exist or is someone else's.
            raise web.HTTPError(404, f"no session {session_id!r}")
        try:
            receipt = await self.broker.db.get_receipt(session_id)
        except NotFound:
            state = "has not ended yet" if record.state != "ended" else "was settled unsigned"
            raise web.HTTPError(404, f"session {session_id!r} has no receipt: it {state}") from None
        self.write_json(receipt)


class ReceiptKeyHandler(BrokerAPIHandler):
    """The public key that checks receipts, and its key_id."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.write_json(
            {
                "key_id": self.settings["gpu_share_receipt_key_id"],
                "public_key_pem": self.settings["gpu_share_receipt_public_pem"],
            }
        )


class ReceiptsHandler(BrokerAPIHandler):
    """The receipt chain in sequence order, a page at a time (admin)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.require_role("admin")
        after = self.get_query_argument("after", "0")
        limit = self.get_query_argument("limit", str(MAX_PAGE))
        if not after.isdigit() or len(after) > 18:
            raise web.HTTPError(400, "'after' must be a sequence number (0 for the start)")
        if not limit.isdigit() or not 0 < int(limit) <= MAX_PAGE:
            raise web.HTTPError(400, f"'limit' must be a whole number from 1 to {MAX_PAGE}")
        page: list[dict[str, Any]] = await self.broker.db.list_receipts(int(after), int(limit))
        self.write_json(
            {
                "receipts": page,
                "next_after": page[-1]["sequence"] if len(page) == int(limit) else None,
            }
        )


class LedgerCheckHandler(BrokerAPIHandler):
    """Whether every transaction balances and every cached balance is right (admin)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.require_role("admin")
        try:
            await self.broker.db.check_ledger()
        except StoreError as error:
            self.write_json({"ok": False, "problems": [str(error)]})
            return
        self.write_json({"ok": True, "problems": []})


def receipt_handlers(api: str) -> list[tuple[str, type]]:
    """The receipt routes under ``api``."""
    sid = r"(?P<session_id>s-[0-9a-f]{1,64})"
    return [
        (rf"{api}/sessions/{sid}/receipt", SessionReceiptHandler),
        (rf"{api}/receipts/public-key", ReceiptKeyHandler),
        (rf"{api}/receipts", ReceiptsHandler),
        (rf"{api}/ledger/check", LedgerCheckHandler),
    ]
