"""Plain, frozen records the store returns, and its errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

STARTING = "starting"
RUNNING = "running"
ENDED = "ended"

MAX_GPU_MODEL_LENGTH = 128
CPU_MODEL = "CPU"


class StoreError(Exception):
    """The store cannot do what was asked."""


class StoreUnavailable(StoreError):
    """The database did not answer in time (locked, gone, disk full): try again later."""


class NotFound(StoreError):
    """A named account, offer or session does not exist."""


class Conflict(StoreError):
    """The request contradicts what the store holds."""


class InsufficientFunds(StoreError):
    """The payer's credit does not cover what was asked."""


def encode_gpu_indices(indices: tuple[int, ...]) -> str:
    """Return the canonical JSON text stored for a list of GPU indices."""
    return json.dumps(list(indices), separators=(",", ":"))


@lru_cache(maxsize=1024)
def decode_gpu_indices(text: str) -> tuple[int, ...]:
    """Return the GPU indices stored as JSON text (a few distinct texts, so cached)."""
    return tuple(json.loads(text))


@dataclass(frozen=True)
class Account:
    """An account and its cached balance."""

    id: int
    name: str
    role: str
    created_us: int
    balance_micro: int


TOKEN_ACTIVE = "active"
TOKEN_EXPIRED = "expired"
TOKEN_REVOKED = "revoked"


@dataclass(frozen=True)
class TokenRecord:
    """What the store tells about a token: its public id and times, never the secret."""

    id: str  # the first 8 hex digits of the token's SHA-256 digest
    account: str
    created_us: int
    expires_us: int | None
    last_used_us: int | None
    revoked_us: int | None
    state: str  # active, expired or revoked


@dataclass(frozen=True)
class OfferSpec:
    """What a host offers: some of its GPUs (none for a CPU-only offer) at a per-second price."""

    gpu_model: str
    gpu_count: int
    gpu_memory_mib: int
    gpu_indices: tuple[int, ...]
    price_per_second_micro: int

    def __post_init__(self) -> None:
        """Check the fields and store the indices as a tuple."""
        indices = tuple(self.gpu_indices)
        object.__setattr__(self, "gpu_indices", indices)
        if not isinstance(self.gpu_model, str) or not self.gpu_model.strip():
            raise ValueError("offer needs a gpu_model")
        if len(self.gpu_model) > MAX_GPU_MODEL_LENGTH:
            raise ValueError(f"gpu_model is longer than {MAX_GPU_MODEL_LENGTH} characters")
        for name in ("gpu_count", "gpu_memory_mib", "price_per_second_micro"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"offer {name} must be a non-negative integer, not {value!r}")
        if self.gpu_count < 1 and self.gpu_model != CPU_MODEL:
            raise ValueError("offer needs at least one GPU (a CPU offer is labelled 'CPU')")
        if not all(_is_int(index) and index >= 0 for index in indices):
            raise ValueError(f"offer gpu_indices must be non-negative integers: {indices!r}")
        if len(set(indices)) != len(indices) or len(indices) != self.gpu_count:
            raise ValueError(
                f"offer gpu_indices {indices!r} must name gpu_count={self.gpu_count} different GPUs"
            )


@dataclass(frozen=True)
class Offer:
    """An offer as stored, with a stable id and the host's account name."""

    id: int
    host: str
    gpu_model: str
    gpu_count: int
    gpu_memory_mib: int
    gpu_indices: tuple[int, ...]
    price_per_second_micro: int
    active: bool
    updated_us: int


@dataclass(frozen=True)
class SessionRecord:
    """A rented kernel: parties by account name, rate, times and, once ended, its bill."""

    id: str
    renter: str
    payer: str
    host: str
    offer_id: int
    price_per_second_micro: int
    gpu_indices: tuple[int, ...]
    state: str
    created_us: int
    ready_us: int | None
    last_seen_us: int | None
    ended_us: int | None
    end_reason: str | None
    billed_seconds: int | None
    amount_micro: int | None
    class_name: str | None = None


@dataclass(frozen=True)
class ClassRecord:
    """A class: its budget account, teacher, per-student quotas and allowed GPU kind."""

    id: int
    name: str
    account: str
    teacher: str
    budget_micro: int
    quota_seconds: int | None
    quota_micro: int | None
    weekly_quota_seconds: int | None
    gpu_model: str | None
    max_price_per_second_micro: int | None
    starts_us: int | None
    ends_us: int | None
    created_us: int


@dataclass(frozen=True)
class StudentUsage:
    """A student's ended sessions in a class."""

    student: str
    seconds: int
    amount_micro: int
    sessions: int
    week_seconds: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
