"""Matching a renter's request to an offer: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..ledger import can_start, format_credits, price_per_hour, session_amount
from .reliability import ranking_reliability


@dataclass(frozen=True)
class OfferView:
    """What matching needs to know of an offer."""

    id: int
    host: str
    gpu_model: str
    gpu_count: int
    gpu_memory_mib: int
    price_per_second_micro: int
    reliability: float | None = None
    shared: bool = False


@dataclass
class HostLoad:
    """Live kernels on one connected host and the offers they occupy."""

    max_kernels: int
    live_kernels: int = 0
    busy_offer_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class SessionRequest:
    """A renter's wishes; every field is optional."""

    offer_id: int | None = None
    gpu_model: str | None = None
    min_gpu_memory_mib: int | None = None
    max_price_per_second_micro: int | None = None
    min_reliability: float | None = None


class NoMatch(Exception):
    """No offer can serve the request; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def offer_is_free(offer: OfferView, load: HostLoad | None) -> bool:
    """Tell whether an offer can take one more kernel now (one renter per GPU)."""
    if load is None or load.live_kernels >= load.max_kernels:
        return False
    return offer.shared or not (offer.gpu_count > 0 and offer.id in load.busy_offer_ids)


def offer_fits(offer: OfferView, request: SessionRequest) -> bool:
    """Tell whether an offer meets a request's model, memory and price wishes."""
    if request.gpu_model and offer.gpu_model.lower() != request.gpu_model.lower():
        return False
    if request.min_gpu_memory_mib and offer.gpu_memory_mib < request.min_gpu_memory_mib:
        return False
    if (
        request.min_reliability is not None
        and offer.reliability is not None
        and offer.reliability < request.min_reliability
    ):
        return False
    return not (
        request.max_price_per_second_micro is not None
        and offer.price_per_second_micro > request.max_price_per_second_micro
    )


def choose_offer(
    offers: Iterable[OfferView],
    loads: Mapping[str, HostLoad],
    request: SessionRequest,
    balance_micro: int,
    minimum_seconds: int,
) -> OfferView:
    """Pick the free offer with the best price per reliable second that the renter can afford."""
    offers = list(offers)
    if request.offer_id is not None:
        chosen = [o for o in offers if o.id == request.offer_id]
        if not chosen:
            raise NoMatch(404, f"offer {request.offer_id} does not exist or its host is offline")
        candidates = chosen
    else:
        candidates = [o for o in offers if offer_fits(o, request)]
        if not candidates:
            raise NoMatch(404, "no online offer matches the request")
    free = [o for o in candidates if offer_is_free(o, loads.get(o.host))]
    if not free:
        raise NoMatch(409, "every matching offer is busy; try again shortly")
    affordable = [
        o for o in free if can_start(balance_micro, o.price_per_second_micro, minimum_seconds)
    ]
    if not affordable:
        cheapest = min(free, key=lambda o: o.price_per_second_micro)
        needed = session_amount(minimum_seconds, cheapest.price_per_second_micro)
        raise NoMatch(
            402,
            f"insufficient credit: starting needs {format_credits(needed)} credits "
            f"({minimum_seconds} s at "
            f"{format_credits(price_per_hour(cheapest.price_per_second_micro))}"
            f"/h), balance is {format_credits(balance_micro)}",
        )
    # The price of a reliable second: a cheap host that often vanishes ranks below a steady one.
    return min(
        affordable,
        key=lambda o: (o.price_per_second_micro / ranking_reliability(o.reliability), o.id),
    )
