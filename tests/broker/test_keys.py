"""The receipt signing key: made once, kept private, refused when others may read it."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from jupyter_gpu_share.broker.keys import KeyFileError, load_or_create, public_pem
from jupyter_gpu_share.ledger.receipts import key_id


def test_the_key_is_made_once_with_mode_0600_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "gpu_share" / "receipt-key.pem"
    key = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create(path)
    assert key_id(again.public_key()) == key_id(key.public_key())
    public = load_pem_public_key(public_pem(key).encode())
    assert key_id(public) == key_id(key.public_key())  # type: ignore[arg-type]
    assert [p.name for p in path.parent.iterdir()] == ["receipt-key.pem"]


def test_a_key_others_may_read_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "receipt-key.pem"
    load_or_create(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError) as raised:
        load_or_create(path)
    message = str(raised.value)
    assert "\n" not in message and "chmod 600" in message and "0640" in message


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "receipt-key.pem"
    path.write_text("not a key\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM key"):
        load_or_create(path)


def test_two_brokers_starting_together_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "receipt-key.pem"
    found: list[Ed25519PrivateKey] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        found.append(load_or_create(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({key_id(key.public_key()) for key in found}) == 1


def test_the_key_file_is_kept_beside_the_admin_token_by_default(tmp_path: Path) -> None:
    from jupyter_gpu_share.broker.app import BrokerApp

    app = BrokerApp(admin_token_file=str(tmp_path / "admin-token"))
    assert app.receipt_key_file == str(tmp_path / "receipt-key.pem")
