"""The broker's store: SQLAlchemy models, engine, Alembic migrations and the Store API."""

from __future__ import annotations

from .records import (
    ENDED,
    RUNNING,
    STARTING,
    Account,
    Conflict,
    InsufficientFunds,
    NotFound,
    Offer,
    OfferSpec,
    SessionRecord,
    StoreError,
)
from .store import FEE_ACCOUNT, MINT_ACCOUNT, Store, migrations_config

__all__ = [
    "ENDED",
    "FEE_ACCOUNT",
    "MINT_ACCOUNT",
    "RUNNING",
    "STARTING",
    "Account",
    "Conflict",
    "InsufficientFunds",
    "NotFound",
    "Offer",
    "OfferSpec",
    "SessionRecord",
    "Store",
    "StoreError",
    "migrations_config",
]
