"""The broker's store: SQLAlchemy models, engine, Alembic migrations and the Store API."""

from __future__ import annotations

from .brokers import LeaseHeld
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
    StoreUnavailable,
    StudentUsage,
    TokenRecord,
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
    "LeaseHeld",
    "NotFound",
    "Offer",
    "OfferSpec",
    "SessionRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StudentUsage",
    "TokenRecord",
    "class_account_name",
    "migrations_config",
]


def unavailable(error: BaseException) -> bool:
    """Tell whether an error means the database did not answer (locked, gone, disk full),
    as opposed to a mistake in what was asked."""
    from sqlalchemy.exc import OperationalError

    return isinstance(error, (StoreUnavailable, OperationalError))
