"""The broker's store: SQLAlchemy models, engine, Alembic migrations and the Store API."""

from __future__ import annotations

from .classes import class_account_name
from .records import (
    ENDED,
    RUNNING,
    STARTING,
    Account,
    ClassRecord,
    Conflict,
    InsufficientFunds,
    NotFound,
    Offer,
    OfferSpec,
    SessionRecord,
    StoreError,
    StudentUsage,
)
from .store import FEE_ACCOUNT, MINT_ACCOUNT, Store, migrations_config

__all__ = [
    "ENDED",
    "FEE_ACCOUNT",
    "MINT_ACCOUNT",
    "RUNNING",
    "STARTING",
    "Account",
    "ClassRecord",
    "Conflict",
    "InsufficientFunds",
    "NotFound",
    "Offer",
    "OfferSpec",
    "SessionRecord",
    "Store",
    "StoreError",
    "StudentUsage",
    "class_account_name",
    "migrations_config",
]
