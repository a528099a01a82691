"""Receipts of a real billed session: fetched by its parties, checked offline, audited."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_share.client import BrokerError
from jupyter_gpu_share.ledger import MICRO, split_fee

from .harness import CLI, ROOT_FLAG, clean_env, eventually, free_port

pytestmark = pytest.mark.e2e


def cli(
    *args: str, token: str | None = None, broker: str | None = None
) -> subprocess.CompletedProcess:
    env = clean_env()
    if token is not None:
        env.update(GPU_SHARE_TOKEN=token, GPU_SHARE_BROKER_URL=broker or "")
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_billed_session_has_a_receipt_its_parties_can_verify(
    make_cluster, tmp_path: Path, monkeypatch
):
    cluster = make_cluster(platform_fee_bps=1500)
    cluster.start_host("host-r", "3.6")
    renter = cluster.account("rita", "user", 100 * MICRO)
    other = cluster.account("olga", "user", 100 * MICRO)
    host = cluster.admin.request("POST", "/accounts/host-r/tokens")["token"]
    client = cluster.client(renter)

    monkeypatch.setenv("GPU_SHARE_BROKER_URL", cluster.url)
    monkeypatch.setenv("GPU_SHARE_TOKEN", renter)

    async def run() -> None:
        km = AsyncKernelManager(kernel_name="gpu-share")
        await km.start_kernel()
        running = cluster.session_of(renter, "running")
        with pytest.raises(BrokerError) as early:
            client.request("GET", f"/sessions/{running['id']}/receipt")
        assert early.value.status == 404 and "not ended" in early.value.message
        await asyncio.sleep(1.2)
        await km.shutdown_kernel(now=True)

    asyncio.run(run())
    session = eventually(lambda: cluster.session_of(renter, "ended"), 20, what="the session end")
    assert session["amount_micro"] > 0
    ended = session
    receipt = client.request("GET", f"/sessions/{session['id']}/receipt")
    assert cluster.client(host).request("GET", f"/sessions/{session['id']}/receipt") == receipt
    assert cluster.admin.request("GET", f"/sessions/{session['id']}/receipt") == receipt
    with pytest.raises(BrokerError) as hidden:
        cluster.client(other).request("GET", f"/sessions/{session['id']}/receipt")
    assert hidden.value.status == 404
    assert receipt["amount_micro"] == ended["amount_micro"]
    assert receipt["billed_seconds"] == ended["billed_seconds"]
    assert (receipt["host_micro"], receipt["fee_micro"]) == split_fee(ended["amount_micro"], 1500)
    assert receipt["renter"] == "rita" and receipt["host"] == "host-r"

    # The renter saves the receipt and the key; anyone can then check it with no broker.
    saved = tmp_path / "receipt.json"
    got = cli("receipt", session["id"], "--out", str(saved), token=renter, broker=cluster.url)
    assert got.returncode == 0, got.stderr
    assert json.loads(saved.read_text()) == receipt
    pem = cli("receipt", "--public-key", token=other, broker=cluster.url)
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    key_file = tmp_path / "broker.pem"
    key_file.write_text(pem.stdout)
    assert (
        cluster.client(other).request("GET", "/receipts/public-key")["key_id"]
        == (receipt["key_id"])
    )
    printed = cli("receipt", session["id"], token=host, broker=cluster.url)
    assert json.loads(printed.stdout) == receipt

    valid = cli("verify", str(saved), "--public-key", str(key_file))
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.startswith(
        f"valid: session {session['id']}, {receipt['billed_seconds']} s, amount "
    )

    # One byte changed (an amount one digit different) and the receipt says what is wrong.
    text = saved.read_text()
    field = f'"amount_micro":{receipt["amount_micro"]}'
    digit = field[-1]
    tampered_text = text.replace(field, field[:-1] + ("1" if digit != "1" else "2"))
    assert len(tampered_text) == len(text) and tampered_text != text
    tampered = tmp_path / "tampered.json"
    tampered.write_text(tampered_text)
    refused = cli("verify", str(tampered), "--public-key", str(key_file))
    assert refused.returncode == 1
    assert "signature does not match" in refused.stderr
    assert "amount_micro is not billed_seconds * price" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    with pytest.raises(BrokerError) as not_admin:
        client.request("GET", "/receipts")
    assert not_admin.value.status == 403
    audit = cli("admin", "audit", token=cluster.admin_token, broker=cluster.url)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "receipts: 1 in 1 key segment(s)" in audit.stdout
    assert f"key {receipt['key_id']}: receipts 1-1 (1)" in audit.stdout
    assert "ledger: balanced" in audit.stdout and "audit passed" in audit.stdout


def test_a_broker_refuses_a_receipt_key_others_may_read(tmp_path: Path):
    key_file = tmp_path / "receipt-key.pem"
    key_file.write_text("whatever\n")
    os.chmod(key_file, 0o644)
    started = subprocess.run(
        [
            *CLI,
            "broker",
            f"--port={free_port()}",
            "--ServerApp.ip=127.0.0.1",
            f"--db=sqlite:///{tmp_path / 'broker.sqlite'}",
            f"--ServerApp.root_dir={tmp_path}",
            *ROOT_FLAG,
            f"--BrokerApp.receipt_key_file={key_file}",
        ],
        env=clean_env(GPU_SHARE_ADMIN_TOKEN="t" * 32),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1
    assert (
        f"gpu-share broker: error: receipt key {key_file} may be read by others (mode 0644); "
        f"run: chmod 600 {key_file}"
    ) in started.stderr
