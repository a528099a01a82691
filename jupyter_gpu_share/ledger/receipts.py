"""Signed settlement receipts anyone can check with the broker's public key (pure, no I/O).

A receipt is a JSON object of strings, integers and nulls (never a float), serialised
canonically: keys sorted, no spaces, UTF-8. Its ``signature`` is Ed25519 over the
canonical bytes of every other field, base64url without padding. Receipts form one chain
in settlement order: ``sequence`` counts from 1 and ``prev_hash`` is the hex SHA-256 of the
previous receipt's canonical bytes, signature included (64 zeros for the first). ``key_id``
is the first 16 hex digits of the SHA-256 of the signing key's raw 32-byte public key, so
a rotated key starts a new segment of the same chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .rules import billed_seconds, split_fee

VERSION = 1
GENESIS_HASH = "0" * 64
SIGNATURE = "signature"

# Each field and the JSON types it may have (None: null).
INTEGER_FIELDS = (
    "version",
    "price_per_second_micro",
    "ended_us",
    "billed_seconds",
    "amount_micro",
    "fee_micro",
    "host_micro",
    "sequence",
)
NULLABLE_INTEGER_FIELDS = ("started_us", "transaction_id")
STRING_FIELDS = (
    "session_id",
    "renter",
    "payer",
    "host",
    "end_reason",
    "prev_hash",
    "key_id",
    SIGNATURE,
)
FIELDS = frozenset(INTEGER_FIELDS + NULLABLE_INTEGER_FIELDS + STRING_FIELDS)

_HEX64 = re.compile(r"[0-9a-f]{64}")


_PLAIN = frozenset((str, int, type(None)))  # exact types: a bool is not a plain int here


def _check_value(path: str, value: Any) -> None:
    if type(value) in _PLAIN:
        return
    if isinstance(value, (bool, float)):
        raise ValueError(f"{path} is a {type(value).__name__}: receipts hold integers only")
    if isinstance(value, int):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has a key that is not a string: {key!r}")
            if type(item) not in _PLAIN:
                _check_value(f"{path}.{key}", item)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(f"{path}[{index}]", item)
        return
    raise ValueError(f"{path} cannot be written in a receipt: {type(value).__name__}")


def canonical_bytes(body: Mapping[str, Any]) -> bytes:
    """Serialise a JSON object canonically: sorted keys, no spaces, UTF-8, no floats."""
    _check_value("receipt", body)
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def signed_bytes(receipt: Mapping[str, Any]) -> bytes:
    """Return the bytes a receipt's signature covers: every field but the signature."""
    return canonical_bytes({k: v for k, v in receipt.items() if k != SIGNATURE})


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of a receipt's canonical bytes, signature included."""
    return hashlib.sha256(canonical_bytes(receipt)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the first 16 hex digits of the SHA-256 of a raw Ed25519 public key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def settlement_body(
    *,
    session_id: str,
    renter: str,
    payer: str,
    host: str,
    price_per_second_micro: int,
    started_us: int | None,
    ended_us: int,
    billed_seconds: int,
    amount_micro: int,
    fee_bps: int,
    end_reason: str,
    transaction_id: int | None,
    sequence: int,
    prev_hash: str,
) -> dict[str, Any]:
    """Return the unsigned body of the receipt of one settlement, with the fee split."""
    host_micro, fee_micro = split_fee(amount_micro, fee_bps)
    return {
        "version": VERSION,
        "session_id": session_id,
        "renter": renter,
        "payer": payer,
        "host": host,
        "price_per_second_micro": price_per_second_micro,
        "started_us": started_us,
        "ended_us": ended_us,
        "billed_seconds": billed_seconds,
        "amount_micro": amount_micro,
        "fee_micro": fee_micro,
        "host_micro": host_micro,
        "end_reason": end_reason,
        "transaction_id": transaction_id,
        "sequence": sequence,
        "prev_hash": prev_hash,
    }


def sign(body: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return the receipt: the body with the key's id and an Ed25519 signature over both."""
    receipt = {k: v for k, v in body.items() if k != SIGNATURE}
    receipt["key_id"] = key_id(private_key.public_key())
    receipt[SIGNATURE] = _b64encode(private_key.sign(canonical_bytes(receipt)))
    return receipt


def _shape_problems(receipt: Mapping[str, Any]) -> list[str]:
    problems = [f"{name} is missing" for name in sorted(FIELDS - set(receipt))]
    problems += [f"{name} is not a receipt field" for name in sorted(set(receipt) - FIELDS)]
    for name in INTEGER_FIELDS + NULLABLE_INTEGER_FIELDS:
        value = receipt.get(name)
        if name not in receipt or (value is None and name in NULLABLE_INTEGER_FIELDS):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} is not an integer")
    for name in STRING_FIELDS:
        if name in receipt and not isinstance(receipt[name], str):
            problems.append(f"{name} is not a string")
    return problems


def verify(receipt: Any, public_key: Ed25519PublicKey) -> list[str]:
    """Return what is wrong with a receipt checked against a public key; empty: valid."""
    if not isinstance(receipt, Mapping):
        return ["the receipt is not a JSON object"]
    problems = _shape_problems(receipt)
    if problems:
        return problems
    if receipt["version"] != VERSION:
        problems.append(f"version {receipt['version']} is not {VERSION}")
    if receipt["key_id"] != key_id(public_key):
        problems.append("key_id is not the id of this public key")
    try:
        signed = signed_bytes(receipt)
        signature = _b64decode(receipt[SIGNATURE])
        # One spelling per signature: base64's unused low bits could otherwise give one
        # receipt several texts, and the chain hashes the text (signature included).
        if _b64encode(signature) != receipt[SIGNATURE]:
            raise ValueError("signature is not canonical base64url")
        public_key.verify(signature, signed)
    except (InvalidSignature, ValueError, binascii.Error):
        problems.append("signature does not match")
    started, ended = receipt["started_us"], receipt["ended_us"]
    billed = receipt["billed_seconds"]
    expected = 0 if started is None else billed_seconds(started, ended)
    if billed != expected:
        problems.append("billed_seconds is not ceil(ended-started)")
    if receipt["price_per_second_micro"] < 0:
        problems.append("price_per_second_micro is negative")
    if receipt["amount_micro"] != billed * receipt["price_per_second_micro"]:
        problems.append("amount_micro is not billed_seconds * price")
    if receipt["fee_micro"] < 0 or receipt["host_micro"] < 0:
        problems.append("fee_micro or host_micro is negative")
    if receipt["fee_micro"] + receipt["host_micro"] != receipt["amount_micro"]:
        problems.append("fee + host share is not the amount")
    if receipt["sequence"] < 1:
        problems.append("sequence is not 1 or more")
    if not _HEX64.fullmatch(receipt["prev_hash"]):
        problems.append("prev_hash is not 64 hex digits")
    elif receipt["sequence"] == 1 and receipt["prev_hash"] != GENESIS_HASH:
        problems.append("prev_hash of the first receipt is not 64 zeros")
    return problems


def chain_problems(
    receipts: Iterable[Mapping[str, Any]], previous: Mapping[str, Any] | None = None
) -> list[str]:
    """Return the breaks in a run of receipts in sequence order: gaps and prev_hash mismatches.

    ``previous`` is the receipt just before the run (none: the run starts the chain).
    """
    problems = []
    expected_sequence = 1 if previous is None else previous.get("sequence", 0) + 1
    expected_hash = GENESIS_HASH if previous is None else receipt_hash(previous)
    for receipt in receipts:
        sequence = receipt.get("sequence")
        if sequence != expected_sequence:
            problems.append(f"sequence {sequence} follows {expected_sequence - 1}: a gap")
        if receipt.get("prev_hash") != expected_hash:
            problems.append(f"prev_hash of sequence {sequence} is not the previous receipt's hash")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            expected_sequence = sequence + 1
        try:
            expected_hash = receipt_hash(receipt)
        except ValueError:
            expected_hash = ""
    return problems


def segments(receipts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the runs of receipts signed by one key: key_id, first and last sequence, count."""
    runs: list[dict[str, Any]] = []
    for receipt in receipts:
        kid, sequence = receipt.get("key_id"), receipt.get("sequence")
        if runs and runs[-1]["key_id"] == kid:
            runs[-1]["last"] = sequence
            runs[-1]["count"] += 1
        else:
            runs.append({"key_id": kid, "first": sequence, "last": sequence, "count": 1})
    return runs


__all__ = [
    "FIELDS",
    "GENESIS_HASH",
    "VERSION",
    "canonical_bytes",
    "chain_problems",
    "key_id",
    "receipt_hash",
    "segments",
    "settlement_body",
    "sign",
    "signed_bytes",
    "verify",
]
