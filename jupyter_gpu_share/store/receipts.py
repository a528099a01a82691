"""Receipts in the store: written with each settlement, read back by session or in order.

The rules (fields, signature, chain) are ``ledger.receipts``; the store only numbers the
receipts and links each to the one before. The chain head is read and the new receipts
inserted inside the settlement's transaction, which holds SQLite's only write lock
(BEGIN IMMEDIATE) or, on PostgreSQL, an advisory lock taken before any account row, so
two brokers on one database never give two receipts one sequence number or one parent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, insert, select, text

from jupyter_gpu_share import clock
from jupyter_gpu_share.ledger.receipts import GENESIS_HASH, canonical_bytes, settlement_body

from . import models
from .records import NotFound

log = logging.getLogger("jupyter_gpu_share.store")

Signer = Callable[[dict[str, Any]], dict[str, Any]]
"""Signs a receipt body and returns the receipt (``ledger.receipts.sign`` with a key)."""

# Any fixed number: the PostgreSQL advisory lock that serialises writers of the chain.
RECEIPT_CHAIN_LOCK_KEY = 0x6770755F7263
MAX_PAGE = 1000

receipts = models.Receipt.__table__

RECEIPT_HEAD = (
    select(receipts.c.sequence, receipts.c.body).order_by(receipts.c.sequence.desc()).limit(1)
)
INSERT_RECEIPT = insert(receipts).values(
    sequence=bindparam("sequence"),
    session_id=bindparam("session_id"),
    key_id=bindparam("key_id"),
    prev_hash=bindparam("prev_hash"),
    body=bindparam("body"),
    created_us=bindparam("created_us"),
)
LOCK_CHAIN = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=RECEIPT_CHAIN_LOCK_KEY)


def receipt_rows(
    signer: Signer,
    head: Any,
    settled: list[tuple[Any, int, str, int, int]],
    transaction_ids: dict[str, int],
    fee_bps: int,
) -> list[dict[str, Any]]:
    """Sign the receipts of ``(session row, ended_us, end_reason, seconds, amount)`` after
    the chain ``head`` (a row of sequence and body, or None) and return their table rows."""
    if head is None:
        sequence, prev_hash = 0, GENESIS_HASH
    else:
        sequence, prev_hash = head.sequence, hashlib.sha256(head.body.encode()).hexdigest()
    created_us = clock.now_us()
    rows = []
    for row, ended_us, end_reason, seconds, amount in settled:
        sequence += 1
        receipt = signer(
            settlement_body(
                session_id=row.id,
                renter=row.renter_name,
                payer=row.payer_name,
                host=row.host_name,
                price_per_second_micro=row.price_per_second_micro,
                started_us=row.ready_us,
                ended_us=ended_us,
                billed_seconds=seconds,
                amount_micro=amount,
                fee_bps=fee_bps,
                end_reason=end_reason,
                transaction_id=transaction_ids.get(row.id),
                sequence=sequence,
                prev_hash=prev_hash,
            )
        )
        body = canonical_bytes(receipt)
        rows.append(
            {
                "sequence": sequence,
                "session_id": row.id,
                "key_id": receipt["key_id"],
                "prev_hash": prev_hash,
                "body": body.decode("utf-8"),
                "created_us": created_us,
            }
        )
        prev_hash = hashlib.sha256(body).hexdigest()
    return rows


class ReceiptStore:
    """The receipt part of ``Store`` (mixed in; uses its engines)."""

    # Store provides: _reader, _signer.
    _reader: Any
    _signer: Signer | None
    _warned_unsigned = False

    def _receipt_signer(self) -> Signer | None:
        """Return the signer, saying once in the log that receipts are off without one."""
        if self._signer is None and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("settlements get no receipts: the store was given no signing key")
        return self._signer

    def get_receipt(self, session_id: str) -> dict[str, Any]:
        """Return the receipt of a settled session."""
        with self._reader.connect() as connection:
            body = connection.execute(
                select(receipts.c.body).where(receipts.c.session_id == session_id)
            ).scalar()
        if body is None:
            raise NotFound(f"no receipt for session {session_id!r}")
        return json.loads(body)

    def list_receipts(self, after: int = 0, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
        """Return up to ``limit`` receipts with sequence numbers above ``after``, in order."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be from 1 to {MAX_PAGE}, not {limit}")
        with self._reader.connect() as connection:
            bodies = connection.execute(
                select(receipts.c.body)
                .where(receipts.c.sequence > after)
                .order_by(receipts.c.sequence)
                .limit(limit)
            ).scalars()
            return [json.loads(body) for body in bodies]
