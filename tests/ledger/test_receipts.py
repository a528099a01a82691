"""Receipts: canonical bytes, signatures, the rules a receipt must keep and the chain."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu_share.ledger import receipts
from jupyter_gpu_share.ledger.receipts import GENESIS_HASH

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
T0 = 1_700_000_000_000_000


def body(sequence: int = 1, prev_hash: str = GENESIS_HASH, **changes: object) -> dict:
    values = {
        "session_id": "s-00ff",
        "renter": "alice",
        "payer": "alice",
        "host": "bob",
        "price_per_second_micro": 278,
        "started_us": T0,
        "ended_us": T0 + 9_500_000,
        "billed_seconds": 10,
        "amount_micro": 2780,
        "fee_bps": 1000,
        "end_reason": "stopped",
        "transaction_id": 7,
        "sequence": sequence,
        "prev_hash": prev_hash,
        **changes,
    }
    return receipts.settlement_body(**values)  # type: ignore[arg-type]


def chain(length: int) -> list[dict]:
    made: list[dict] = []
    for sequence in range(1, length + 1):
        prev = receipts.receipt_hash(made[-1]) if made else GENESIS_HASH
        made.append(receipts.sign(body(sequence, prev, session_id=f"s-{sequence:04x}"), KEY))
    return made


def test_canonical_bytes_sort_keys_without_spaces_in_utf8() -> None:
    assert receipts.canonical_bytes({"b": 1, "a": "é", "c": None}) == (
        '{"a":"é","b":1,"c":null}'.encode()
    )


@pytest.mark.parametrize("value", [1.0, True, float("nan"), {"x": [0.5]}, b"x"])
def test_canonical_bytes_refuse_floats_booleans_and_bytes(value: object) -> None:
    with pytest.raises(ValueError):
        receipts.canonical_bytes({"v": value})


def test_a_signed_receipt_verifies_and_splits_the_fee() -> None:
    receipt = receipts.sign(body(), KEY)
    assert receipts.verify(receipt, PUBLIC) == []
    assert receipt["fee_micro"] == 278 and receipt["host_micro"] == 2502
    assert receipt["key_id"] == receipts.key_id(PUBLIC) and len(receipt["key_id"]) == 16
    assert "=" not in receipt["signature"]
    # A copy written any other way (indented, reordered) is the same receipt.
    assert receipts.verify(json.loads(json.dumps(receipt, indent=2)), PUBLIC) == []


def test_a_session_never_ready_bills_nothing() -> None:
    receipt = receipts.sign(
        body(started_us=None, billed_seconds=0, amount_micro=0, transaction_id=None), KEY
    )
    assert receipts.verify(receipt, PUBLIC) == []


def test_another_key_does_not_verify() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    problems = receipts.verify(receipts.sign(body(), KEY), other)
    assert "signature does not match" in problems
    assert "key_id is not the id of this public key" in problems


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"billed_seconds": 9, "amount_micro": 9 * 278},
            "billed_seconds is not ceil(ended-started)",
        ),
        ({"amount_micro": 2781}, "amount_micro is not billed_seconds * price"),
        ({"price_per_second_micro": 279}, "amount_micro is not billed_seconds * price"),
        ({"fee_micro": 1}, "fee + host share is not the amount"),
        ({"prev_hash": "1" * 64}, "prev_hash of the first receipt is not 64 zeros"),
        ({"prev_hash": "xyz"}, "prev_hash is not 64 hex digits"),
        ({"sequence": 0}, "sequence is not 1 or more"),
    ],
)
def test_a_receipt_signed_with_wrong_figures_names_them(changes: dict, problem: str) -> None:
    unsigned = {**body(), **changes}
    receipt = receipts.sign(unsigned, KEY)  # even the broker's own signature cannot make it right
    problems = receipts.verify(receipt, PUBLIC)
    assert problem in problems and "signature does not match" not in problems


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"amount_micro": 2780.0}, "amount_micro is not an integer"),
        ({"renter": 5}, "renter is not a string"),
        ({"extra": 1}, "extra is not a receipt field"),
        ({"signature": "!!"}, "signature does not match"),
    ],
)
def test_malformed_receipts_are_named(changes: dict, problem: str) -> None:
    receipt = {**receipts.sign(body(), KEY), **changes}
    assert problem in receipts.verify(receipt, PUBLIC)


def test_missing_fields_and_non_objects() -> None:
    receipt = receipts.sign(body(), KEY)
    del receipt["host_micro"]
    assert receipts.verify(receipt, PUBLIC) == ["host_micro is missing"]
    assert receipts.verify([1], PUBLIC) == ["the receipt is not a JSON object"]


FIELD_NAMES = sorted(receipts.FIELDS)


def _tampered(value: object, draw: st.DrawFn) -> object:
    if value is None:
        return draw(st.integers(min_value=0, max_value=2**40))
    if isinstance(value, int):
        return draw(
            st.integers(min_value=-(2**63), max_value=2**63 - 1).filter(lambda v: v != value)
        )
    assert isinstance(value, str)
    return draw(st.text(max_size=90).filter(lambda v: v != value))


@st.composite
def tampering(draw: st.DrawFn) -> tuple[str, object]:
    name = draw(st.sampled_from(FIELD_NAMES))
    return name, _tampered(ORIGINAL[name], draw)


ORIGINAL = receipts.sign(body(), KEY)


@settings(max_examples=400, deadline=None)
@given(tampering())
def test_tampering_any_field_breaks_verify(change: tuple[str, object]) -> None:
    name, value = change
    receipt = {**ORIGINAL, name: value}
    assert receipts.verify(receipt, PUBLIC), f"{name}={value!r} still verifies"


def test_a_signature_spelt_another_way_is_refused() -> None:
    """64 bytes are 86 base64url characters whose last one has 4 unused bits: flipping one
    gives the same bytes in another text, which verify refuses (found by the test below)."""
    last = ORIGINAL["signature"][-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = alphabet[alphabet.index(last) ^ 1]
    respelt = {**ORIGINAL, "signature": ORIGINAL["signature"][:-1] + other}
    assert "signature does not match" in receipts.verify(respelt, PUBLIC)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_flipping_any_bit_of_the_file_breaks_it(position: int, bit: int) -> None:
    data = bytearray(receipts.canonical_bytes(ORIGINAL))
    data[position % len(data)] ^= 1 << bit
    try:
        parsed = json.loads(data.decode("utf-8"))
    except ValueError:
        return  # no longer JSON: refused before any check
    assert parsed != ORIGINAL and receipts.verify(parsed, PUBLIC)


def test_a_chain_has_no_problems_and_one_segment() -> None:
    made = chain(5)
    assert receipts.chain_problems(made) == []
    assert receipts.chain_problems(made[2:], previous=made[1]) == []
    assert receipts.segments(made) == [
        {"key_id": receipts.key_id(PUBLIC), "first": 1, "last": 5, "count": 5}
    ]


def test_chain_problems_name_gaps_and_broken_links() -> None:
    made = chain(5)
    assert receipts.chain_problems(made[:2] + made[3:]) == [
        "sequence 4 follows 2: a gap",
        "prev_hash of sequence 4 is not the previous receipt's hash",
    ]
    swapped = [*made[:2], receipts.sign({**made[2], "prev_hash": "1" * 64}, KEY), *made[3:]]
    problems = receipts.chain_problems(swapped)
    assert "prev_hash of sequence 3 is not the previous receipt's hash" in problems
    assert "prev_hash of sequence 4 is not the previous receipt's hash" in problems
    assert receipts.chain_problems(made[1:]) == [
        "sequence 2 follows 0: a gap",
        "prev_hash of sequence 2 is not the previous receipt's hash",
    ]


def test_a_new_key_starts_a_new_segment_of_the_same_chain() -> None:
    made = chain(2)
    new_key = Ed25519PrivateKey.generate()
    third = receipts.sign(body(3, receipts.receipt_hash(made[1])), new_key)
    assert receipts.chain_problems([*made, third]) == []
    assert receipts.verify(third, new_key.public_key()) == []
    assert [run["key_id"] for run in receipts.segments([*made, third])] == [
        receipts.key_id(PUBLIC),
        receipts.key_id(new_key.public_key()),
    ]
